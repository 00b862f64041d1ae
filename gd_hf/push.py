"""`python -m gd_hf.push OUTPUT_DIR REPO_ID ...`: push an export to the Hub. The command's name only; the code is
`gd_hf.hub.push`."""

import sys

from gd_hf.hub.push import main

if __name__ == "__main__":
    sys.exit(main())
