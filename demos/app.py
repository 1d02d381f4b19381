"""One Gradio app with every pipeline's demo as a tab.

    python demos/app.py [--cd-checkpoint DIR] [--seg-checkpoint DIR] [--fewshot-checkpoint DIR]
                        [--points-checkpoint DIR] [--sd-pipeline DIR]
                        [--port N] [--host H] [--share]
    visionpeft demo     [the same options]

Each tab is a demo module in this folder whose ``build(**kwargs)`` returns a ``gr.Blocks``;
the hub renders that Blocks inside a tab (``gr.TabbedInterface``), so every demo still runs
on its own too (``python demos/change_detection.py ...``). Adding a pipeline's tab is one
entry in TABS.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Callable, NamedTuple

HERE = Path(__file__).resolve().parent


class Option(NamedTuple):
    """A command-line option of the hub passed to one tab's ``build()``."""

    flag: str  # "--cd-checkpoint": the hub's flag; build_app() takes it as cd_checkpoint=
    keyword: str  # the tab's build() keyword it fills
    help: str = ""
    check: Callable[[str], object] | None = None  # raises FileNotFoundError / ValueError on a bad value
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


class Tab(NamedTuple):
    label: str  # the tab's name in the page
    module: str | Callable  # demos/<module>.py defining build(**kwargs) -> gr.Blocks, or such a build
    options: tuple[Option, ...] = ()


def _cd_checkpoint(path: str):
    from visionpeft.pipelines.change_detection import find_checkpoint

    return find_checkpoint(path)  # FileNotFoundError: not a checkpoint, nor its best/ or adapter/


def _seg_checkpoint(path: str):
    from visionpeft.pipelines.segmentation import find_checkpoint

    return find_checkpoint(path)  # FileNotFoundError: not a checkpoint, nor its best/ or adapter/


def _fewshot_checkpoint(path: str):
    from visionpeft.pipelines.fewshot_clip import find_checkpoint

    return find_checkpoint(path)  # FileNotFoundError: no fewshot_config.json in it, its best/ or adapter/


def _points_checkpoint(path: str):
    from visionpeft.pipelines.pointcloud import find_checkpoint

    return find_checkpoint(path)  # FileNotFoundError: no points_config.json in it, its best/ or adapter/


def _sd_pipeline(path: str):
    return load_demo("generation").find_pipeline(path)  # FileNotFoundError: no folder, or no model_index.json


# One entry per pipeline; the first is the tab open on load.
TABS: list[Tab] = [
    Tab("Change detection", "change_detection",
        (Option("--cd-checkpoint", keyword="default_checkpoint", check=_cd_checkpoint, metavar="DIR",
                help="a trained PeftCD checkpoint: an output_dir, its best/ or adapter/ (the tab's "
                     "default; the page can change it)"),)),
    Tab("Segmentation", "segmentation",
        (Option("--seg-checkpoint", keyword="default_checkpoint", check=_seg_checkpoint, metavar="DIR",
                help="a trained segmentation checkpoint: an output_dir, its best/ or adapter/ (the tab's "
                     "default; the page can change it)"),)),
    Tab("Few-shot", "fewshot",
        (Option("--fewshot-checkpoint", keyword="default_checkpoint", check=_fewshot_checkpoint, metavar="DIR",
                help="a few-shot CLIP checkpoint (task: fewshot_clip): an output_dir or its adapter/, loaded "
                     "at start (the page can load another)"),)),
    Tab("Point clouds", "points",
        (Option("--points-checkpoint", keyword="default_checkpoint", check=_points_checkpoint, metavar="DIR",
                help="a point-cloud classification checkpoint (task: point_classification): an output_dir, its "
                     "best/ or adapter/ (the tab's default; the page can change it)"),)),
    Tab("Generation", "generation",
        (Option("--sd-pipeline", keyword="default_pipeline", check=_sd_pipeline, metavar="DIR",
                help="a diffusers Stable Diffusion 1.x/2.x or SDXL pipeline folder, or embedded-sd (the packaged "
                     "model, the tab's default; the page can change it)"),)),
]


def load_demo(name: str):
    """demos/<name>.py as module ``name``: the same module object the tests get with demos/
    on sys.path and ``import <name>``."""
    path = HERE / f"{name}.py"
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == path:
        return loaded
    if not path.is_file():
        raise FileNotFoundError(f"no demo module {path}")
    if name != "demo_common":  # what the tabs import, registered by file (sys.path left alone)
        load_demo("demo_common")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def check_options(tabs: list[Tab] | None = None, **options) -> dict:
    """The options with None dropped; unknown names raise TypeError and bad values the
    tab's check error (FileNotFoundError / ValueError), before anything is built."""
    tabs = TABS if tabs is None else tabs
    known = {o.dest: o for t in tabs for o in t.options}
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"unknown demo option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    given = {k: v for k, v in options.items() if v is not None}
    for key, value in given.items():
        if known[key].check is not None and value != "":
            known[key].check(value)
    return given


def build_app(tabs: list[Tab] | None = None, **options):
    """The hub: a ``gr.Blocks`` with one tab per entry of ``tabs`` (default TABS).
    ``options`` are the hub's flags as keywords, e.g. ``cd_checkpoint="output/cd"``."""
    tabs = TABS if tabs is None else tabs
    given = check_options(tabs, **options)  # bad values fail before gradio is imported

    import gradio as gr

    demos = []
    for tab in tabs:
        kwargs = {o.keyword: given[o.dest] for o in tab.options if o.dest in given}
        build = tab.module if callable(tab.module) else load_demo(tab.module).build
        demos.append(build(**kwargs))
    return gr.TabbedInterface(demos, [t.label for t in tabs], title="visionpeft demos")


def add_arguments(parser: argparse.ArgumentParser, tabs: list[Tab] | None = None) -> None:
    parser.add_argument("--port", type=int, default=7860, metavar="N")
    parser.add_argument("--host", default="127.0.0.1", metavar="H",
                        help="address to bind (0.0.0.0: every interface)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    for tab in TABS if tabs is None else tabs:
        for o in tab.options:
            parser.add_argument(o.flag, dest=o.dest, metavar=o.metavar, help=f"{tab.label}: {o.help}")


def serve(host: str = "127.0.0.1", port: int | None = 7860, share: bool = False, **options) -> None:
    """Build the hub and serve it until interrupted."""
    build_app(**options).launch(server_name=host, server_port=port, share=share)


def main(argv=None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    options = vars(p.parse_args(argv))
    host, port, share = options.pop("host"), options.pop("port"), options.pop("share")
    try:
        app = build_app(**options)
    except (FileNotFoundError, ValueError) as err:  # one line, no traceback
        p.exit(2, f"{p.prog}: {err}\n")
    app.launch(server_name=host, server_port=port, share=share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
