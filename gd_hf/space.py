"""`python -m gd_hf.space MODEL OUT ...`: write (and push) a Gradio Space for a model. The command's name only; the
code is `gd_hf.hub.space`."""

import sys

from gd_hf.hub.space import main

if __name__ == "__main__":
    sys.exit(main())
