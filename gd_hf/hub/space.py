"""Write (and push) a Gradio Space in which visitors try a gd_hf model on their own images.

    python -m gd_hf.space MODEL OUT [--push SPACE_ID] [--private] [--model-id HUB_ID] [--title T] [--overwrite]

MODEL: an export folder (has config.json), a run's output folder (its final/ export, as gd_hf.push, predict and
evaluate take; --folder best for the best one)
or a hub model id (only its small files are read: config, card, examples). OUT receives:

  app.py              the Gradio app (`python app.py`; GRADIO_SERVER_NAME / GRADIO_SERVER_PORT are respected)
  space_config.json   the model the app loads, its title and description, the example images
  README.md           the Space card: the metadata the Hub reads (sdk: gradio, ...) and what the model is
  requirements.txt    gd_hf's runtime dependencies and gradio
  gd_hf/              a copy of gd_hf's code (it is not on PyPI): the Space predicts exactly as gd_hf.predict
  examples/           the export's examples/ images, if it has any
  model/              the export, when no hub id is known (MODEL is local and no --model-id): a self-contained Space

The app loads $GD_HF_MODEL if set, else the hub id (MODEL or --model-id), else model/. OUT must be empty, absent
or a Space written by this command (anything else needs --overwrite, which replaces only the paths above).
--push SPACE_ID creates the Space (gradio SDK) and uploads OUT, retrying transient failures; a failed push
leaves OUT as it is and prints the command that pushes again. Exit codes: 2 bad input, 3 failed push.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from gd_hf.config import ModelConfig
from gd_hf.files import output_problem
from gd_hf.hub.public import is_hub_id, pushed_to
from gd_hf.hub.push import PushError, push_export
from gd_hf.hub.run_folder import RunFolderError, export_folder
from gd_hf.models import display_name

PACKAGE = Path(__file__).resolve().parents[1]  # the gd_hf package a Space gets a copy of
MADE_BY = "gd_hf.space"  # (the marker in space_config.json: the command that writes it, since the first release)
WRITTEN = ["app.py", "space_config.json", "README.md", "requirements.txt", "gd_hf", "examples", "model"]
EXAMPLE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
HUB_FILES = ["config.json", "preprocessor_config.json", "eval_results.json", "README.md", "examples/*"]
# sdk_version when gradio is not installed here (gd_hf.space only writes files): the version the tests ran.
TESTED_GRADIO_VERSION = "6.31.0"


class SpaceError(ValueError):
    """MODEL or OUT cannot make a Space; the message says why."""


@dataclass
class ModelSource:
    folder: Path  # config.json, and the card, eval_results.json and examples/ where there are
    hub_id: str | None  # the id the Space loads, when there is one
    is_full_export: bool  # a local export with its weights (copied to model/ when there is no hub id)


def resolve_model(model: str, model_id: str | None = None, folder: str = "final") -> ModelSource:
    """The export MODEL names (a run folder gives its export `folder`; it says which on stdout)."""
    if model_id is not None and not is_hub_id(model_id):
        raise SpaceError(f"--model-id {model_id!r} is not a hub model id (owner/name): the Space could not load it")
    path = Path(model)
    if path.is_dir():
        try:
            folder = export_folder(path, folder)
        except RunFolderError as e:
            raise SpaceError(f"MODEL {model} is neither an export folder (config.json) nor a run folder with a "
                             f"{folder}/ export") from e  # fmt: skip
        if folder != path:
            print(f"using the run's {folder.name}/ export: {folder}")
        pushed = pushed_to(folder)
        if model_id is None and pushed is not None and "@" not in pushed:
            # Pushed already: the Space loads it from the Hub (and links it) instead of carrying a copy.
            print(f"the export was pushed to {pushed}: the Space loads it from there (--model-id to name another)")
            model_id = pushed
        elif model_id is None and pushed is not None:
            print(f"the export was pushed to a branch ({pushed}), which a Space cannot name: it gets a copy")
        return ModelSource(folder, model_id, is_full_export=True)
    if not is_hub_id(model):
        raise SpaceError(f"MODEL {model} is neither an export folder, a run folder nor a hub id (owner/name)")
    # (An owner/name that is no local folder is read as a hub id; the error says both.)
    from huggingface_hub import snapshot_download

    try:  # the small files only: the weights are the Space's to download
        folder = Path(snapshot_download(model, allow_patterns=HUB_FILES))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, no access: all one-line errors
        why = f"{type(e).__name__}: {' '.join(str(e).split())}"
        raise SpaceError(f"MODEL {model} is no local folder, and reading it as a hub id failed: {why}") from e
    if not (folder / "config.json").is_file():
        raise SpaceError(f"the hub repo {model} has no config.json: not a transformers model")
    return ModelSource(folder, model_id or model, is_full_export=False)


def is_our_space(out: Path) -> bool:
    try:
        return json.loads((out / "space_config.json").read_text()).get("made_by") == MADE_BY
    except (OSError, ValueError, AttributeError):
        return False


def runtime_requirements() -> list[str]:
    """gd_hf's runtime dependencies (no extras): from the pyproject beside the code being copied when it is a
    checkout (installed metadata can be older than the code on PYTHONPATH), else from the installed metadata."""
    pyproject = PACKAGE.parent / "pyproject.toml"
    try:
        import tomllib  # Python >= 3.11
    except ImportError:
        tomllib = None
    if pyproject.is_file() and tomllib is not None:
        project = tomllib.loads(pyproject.read_text()).get("project", {})
        if project.get("name") == "gd_hf":
            return list(project["dependencies"])
    requires = importlib.metadata.requires("gd_hf") or []
    return [r for r in requires if "extra" not in r.partition(";")[2]]


def gradio_version() -> str:
    try:
        return importlib.metadata.version("gradio")
    except importlib.metadata.PackageNotFoundError:
        return TESTED_GRADIO_VERSION


def copy_gd_hf(destination: Path) -> None:
    """gd_hf's own .py files (subpackages included; no caches, tests or data)."""
    package = PACKAGE
    for source in sorted(package.rglob("*.py")):
        if "__pycache__" in source.parts:
            continue
        target = destination / source.relative_to(package)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def card_metadata(folder: Path) -> dict:
    """The model card's YAML metadata (license, model-index), {} without a card."""
    if not (folder / "README.md").is_file():
        return {}
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md").data.to_dict()


def default_title(source: ModelSource) -> str:
    if source.hub_id:
        return source.hub_id.split("/")[-1]
    folder = source.folder.resolve()
    # A run's best/ or final/ export is named for its run.
    return folder.parent.name if folder.name in ("best", "final") else folder.name


def describe_model(config: dict, metadata: dict, metrics: dict) -> str:
    """One paragraph: family, classes, the recorded mask AP, where it comes from."""
    family = display_name(config.get("model_type"), config.get("model_type", "a"))
    names = [config["id2label"][k] for k in sorted(config.get("id2label", {}), key=int)]
    shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
    text = f"{family} instance segmentation of {len(names)} classes ({shown}), trained with "
    text += "gd_hf (Guided Distillation, [arXiv 2308.02668](https://arxiv.org/abs/2308.02668), semi-supervised)."
    if "AP" in metrics:
        datasets = [r.get("dataset", {}).get("name") for m in metadata.get("model-index") or [] for r in m["results"]]
        on = f" on {datasets[0]}" if datasets and datasets[0] else ""
        text += f" Mask AP {metrics['AP']:.1f}{on}."
    return text + " Upload an image or click an example; lower the threshold to see less certain instances."


def space_readme(title: str, description: str, family: str, hub_id: str | None, license_id: str | None) -> str:
    """The Space card: metadata the Hub reads, then what the model is and where it comes from."""
    from huggingface_hub import SpaceCard, SpaceCardData

    data = SpaceCardData(
        title=title,
        emoji="🧩",
        colorFrom="indigo",
        colorTo="green",
        sdk="gradio",
        sdk_version=gradio_version(),
        app_file="app.py",
        license=license_id,
        models=[hub_id] if hub_id else None,
        short_description=f"{family} instance segmentation, trained with gd_hf"[:60],
    )
    if hub_id:
        where = f"The model is [{hub_id}](https://huggingface.co/{hub_id})."
    else:
        where = "The model is in `model/` in this Space (a self-contained Space: no model repo is needed)."
    body = (
        f"# {title}\n\n{description}\n\n{where} Set the `GD_HF_MODEL` variable to load another gd_hf model.\n\n"
        "The predictions are gd_hf's own: `gd_hf/` is a copy of its code, and a picture gives the instances "
        "`python -m gd_hf.predict` gives for it. The API endpoint `/segment` takes (image, threshold).\n"
    )
    return str(SpaceCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def write_space(
    model: str, out: Path, model_id: str | None = None, title: str | None = None, overwrite: bool = False,
    folder: str = "final",
) -> Path:  # fmt: skip
    """Write a Gradio Space for `model` (an export or run folder, or a hub id) into `out`; returns `out`."""
    out = Path(out)
    if problem := output_problem(out, folder=True):
        raise SpaceError(f"OUT: {problem}")
    if out.is_dir() and any(out.iterdir()) and not is_our_space(out) and not overwrite:
        raise SpaceError(f"OUT {out} is not empty and not a Space written by gd_hf.space: give --overwrite")
    source = resolve_model(model, model_id, folder)
    inside = {out.resolve(), *out.resolve().parents} & {source.folder.resolve(), *source.folder.resolve().parents}
    if out.resolve() in inside or source.folder.resolve() in inside:  # one holds the other: copies would recurse
        raise SpaceError(f"OUT {out} and the export {source.folder} must be separate folders, neither inside the other")
    try:  # what the Space says of the model, from the export's small files
        config = read_json(source.folder / "config.json")
        metadata = card_metadata(source.folder)
        metrics = read_json(source.folder / "eval_results.json")
        # (a config.json without model_type: the default family's, as transformers' Auto classes could not load it)
        family = display_name(config.get("model_type") or ModelConfig.family, config.get("model_type") or "")
        description = describe_model(config, metadata, metrics)
    except Exception as e:  # noqa: BLE001 - a corrupt config.json, card or eval_results.json: one line, OUT untouched
        raise SpaceError(
            f"the export {source.folder} cannot be described ({type(e).__name__}: {e}): its config.json (with an "
            "id2label of class ids), README.md or eval_results.json is damaged; export it again"
        ) from e
    title = title or default_title(source)

    out.mkdir(parents=True, exist_ok=True)
    for name in WRITTEN:  # only what this command writes: a .git or other files stay
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    copy_gd_hf(out / "gd_hf")
    shutil.copyfile(PACKAGE / "hub" / "space_app.py", out / "app.py")
    examples = sorted(p for p in (source.folder / "examples").glob("*") if p.suffix.lower() in EXAMPLE_SUFFIXES)
    if examples:
        (out / "examples").mkdir()
        for example in examples:
            shutil.copyfile(example, out / "examples" / example.name)
    if source.hub_id is None:
        # The model's card stays behind: it names the machine's paths (usage snippet, recipe); the Space card
        # describes the model instead.
        shutil.copytree(source.folder, out / "model", ignore=shutil.ignore_patterns("README.md", "examples", ".*"))
    space = {
        "made_by": MADE_BY,
        "model": source.hub_id or "model",
        "title": title,
        "description": description,
        "examples": [p.name for p in examples],
    }
    (out / "space_config.json").write_text(json.dumps(space, indent=2) + "\n")
    (out / "requirements.txt").write_text("\n".join([*runtime_requirements(), "gradio>=5"]) + "\n")
    readme = space_readme(title, space["description"], family, source.hub_id, metadata.get("license"))
    (out / "README.md").write_text(readme)
    return out


def push_space(out: str | Path, space_id: str, private: bool = False, again: str | None = None) -> str:
    """Create the Space `space_id` (gradio SDK) if needed and upload `out`; returns the commit URL. Raises
    `PushError` (OUT untouched) saying how to push again (`again`, default: a one-line Python call)."""
    out = Path(out)
    if not is_our_space(out):
        raise PushError(f"{out} is not a Space written by gd_hf.space")
    again = again or (
        f"python -c \"from gd_hf.hub.space import push_space; push_space('{out}', '{space_id}', private={private})\""
    )
    return push_export(
        out,
        space_id,
        private=private,
        commit_message="Upload Space written by gd_hf.space",
        repo_type="space",
        space_sdk="gradio",
        again=again,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gd_hf.space", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("model", help="export folder, run output folder, or hub model id")
    parser.add_argument("out", help="folder to write the Space into")
    parser.add_argument("--push", metavar="SPACE_ID", help="create this Space (owner/name) and upload OUT to it")
    parser.add_argument("--private", action="store_true", help="create the Space private")
    parser.add_argument("--model-id", help="the hub id the Space loads the model from (default: MODEL if a hub id)")
    parser.add_argument("--title", help="the Space's title (default: the model's name)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT that is not our Space")
    parser.add_argument("--folder", default="final", help="which export of a run folder (default: final, as push)")
    args = parser.parse_args(argv)
    if args.push and not is_hub_id(args.push):
        print(f"error: --push {args.push} is not a Space id (owner/name)", file=sys.stderr)
        return 2
    try:
        out = write_space(args.model, Path(args.out), args.model_id, args.title, args.overwrite, args.folder)
    except SpaceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = json.loads((out / "space_config.json").read_text())["model"]
    print(f"wrote a Space for {args.model} (it loads {model}) -> {out}; try it: cd {out} && python app.py")
    if not args.push:
        return 0
    # The same command pushes again: it rewrites OUT (a Space of ours) identically and pushes.
    again = shlex.join(["python", "-m", "gd_hf.space", *(argv if argv is not None else sys.argv[1:])])
    try:
        url = push_space(out, args.push, args.private, again)
    except PushError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    print(f"pushed {out} -> {url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
