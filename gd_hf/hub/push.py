"""Push an exported model folder to the Hub, retrying transient failures.

    python -m gd_hf.push OUTPUT_DIR REPO_ID [--revision BRANCH] [--private] [--folder final]

OUTPUT_DIR is a run's output folder (its `final/` export is pushed; `--folder best` for the best one) or an
export folder itself. The export's card is written anew for REPO_ID first (title, model-index name, snippet), as
a push at the end of training writes it. The token comes from huggingface_hub's usual places (`hf auth login`, `HF_TOKEN`); it is
never printed. A failed push changes nothing locally: run the same command again.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from gd_hf.files import write_text_atomic
from gd_hf.hub.model_card import card_for_repo
from gd_hf.hub.run_folder import RunFolderError, export_folder

logger = logging.getLogger(__name__)

TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}


class PushError(RuntimeError):
    """A push failed for good; the message says how to push again."""


def record_push(folder: str | Path, repo_id: str, revision: str | None) -> None:
    """Note in the export's `run_info.json` where it was pushed (a later run distilling from this export names
    its teacher by that id in the recipe it publishes). Exports without that file are left alone."""
    path = Path(folder) / "run_info.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if isinstance(record, dict):
        record["pushed_to"] = {"repo_id": repo_id, "revision": revision}
        write_text_atomic(path, json.dumps(record, indent=2) + "\n")


def push_command(output: Path, repo_id: str, revision: str | None, private: bool) -> str:
    parts = ["python -m gd_hf.push", str(output), repo_id]
    if revision:
        parts += ["--revision", revision]
    if private:
        parts.append("--private")
    return " ".join(parts)


def _transport_errors() -> tuple[type[Exception], ...]:
    """The HTTP client's transport errors (refused, dropped or timed-out connections). huggingface_hub 1.x/2.x
    talk through httpx (or its fork httpx2), whose errors are not `ConnectionError` or `OSError`."""
    found: list[type[Exception]] = []
    for name in ("httpx", "httpx2"):
        try:
            found.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _is_transient(error: Exception) -> bool:
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        return status is None or status in TRANSIENT_STATUS
    return isinstance(error, (ConnectionError, TimeoutError, OSError, *_transport_errors()))


def push_export(
    folder: str | Path,
    repo_id: str,
    revision: str | None = None,
    private: bool = False,
    commit_message: str = "Upload model trained with gd_hf",
    retries: int = 4,
    backoff_s: float = 2.0,
    repo_type: str = "model",
    space_sdk: str | None = None,
    again: str | None = None,
) -> str:
    """Create the repo (and branch) if needed and upload `folder` as one commit; returns the commit URL.

    Transient failures (refused, dropped or timed-out connections; HTTP 408/425/429/5xx) are retried `retries`
    times, waiting `backoff_s`, then twice as long before each next retry; anything else (bad token, no access) fails at once. Raises `PushError` with the command that
    pushes again (`again`; default: this module's). `repo_type="space"` pushes a Space (`space_sdk` is the SDK
    it is created with)."""
    folder = Path(folder)
    api = HfApi()
    attempt = 0
    while True:
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type=repo_type, space_sdk=space_sdk)
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type=repo_type)
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=str(folder),
                revision=revision,
                commit_message=commit_message,
                repo_type=repo_type,
            )
            return str(getattr(info, "commit_url", info))
        except Exception as e:  # noqa: BLE001 - classified below; the original is chained
            if attempt < retries and _is_transient(e):
                wait = backoff_s * 2**attempt
                attempt += 1
                logger.warning(
                    "push of %s to %s failed (%s); retry %d/%d in %.1f s", folder, repo_id, e, attempt, retries, wait
                )
                time.sleep(wait)
                continue
            why = " ".join(str(e).splitlines())  # one line: HTTP errors add a line of advice
            raise PushError(
                f"pushing {folder} to {repo_id}{'@' + revision if revision else ''} failed: {type(e).__name__}: {why}. "
                f"The local {'export' if repo_type == 'model' else 'folder'} is intact; push it again with: "
                f"{again or push_command(folder, repo_id, revision, private)}"
            ) from e


def quiet_http_requests() -> None:
    """httpx (under huggingface_hub; `httpx2` in huggingface_hub 2) logs each request at INFO: about ten
    `HTTP Request: POST ...` lines a push. Its warnings still show."""
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gd_hf.push", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("output", help="a run's output folder, or an export folder")
    parser.add_argument("repo_id")
    parser.add_argument("--revision", help="branch (created if absent); default: the default branch")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--folder", default="final", help="which export of a run folder (default: final)")
    parser.add_argument("--retries", type=int, default=4, help="retries after transient failures (default 4)")
    parser.add_argument("--backoff-s", type=float, default=2.0, help="wait before the first retry, doubled after each")
    args = parser.parse_args(argv)
    if args.retries < 0:
        parser.error(f"--retries must be >= 0 (got {args.retries})")
    if not 0 <= args.backoff_s <= 3600:  # (NaN fails too)
        parser.error(f"--backoff-s must be in [0, 3600] seconds (got {args.backoff_s})")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_http_requests()
    card, folder, pushed = None, None, False
    try:
        folder = export_folder(args.output, args.folder)
        # The card names the repository it goes to, as a push at the end of training writes it (and is put back
        # if the push fails: a failed push changes nothing locally).
        card = (folder / "README.md").read_text() if (folder / "README.md").is_file() else None
        if not card_for_repo(folder, args.repo_id, args.revision):
            print(f"note: {folder}/README.md is left as it is (the export does not keep the facts gd_hf writes a card "
                  "from: exported by an older gd_hf, or not by gd_hf)", file=sys.stderr)  # fmt: skip
        url = push_export(
            folder, args.repo_id, args.revision, args.private, retries=args.retries, backoff_s=args.backoff_s
        )
        pushed = True
    except RunFolderError as e:  # nothing to push: a bad argument
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PushError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    finally:  # whatever stopped it (a refusal, an error, Ctrl-C), a failed push changes nothing locally
        if card is not None and not pushed:
            write_text_atomic(folder / "README.md", card)
    record_push(folder, args.repo_id, args.revision)
    print(f"pushed {folder} -> {url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
