"""The import contract: every module's imports (parsed with ast, lazy ones inside
functions included) go only to its own layer or lower ones, methods never import each
other, core and interop never touch a method's parameters, and pipelines, scripts and
demos use only the public API. A failure names the file, line and import."""
import ast
import dataclasses
from pathlib import Path

import pytest

import visionpeft as vp
from visionpeft.interop.factors import Factors

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "visionpeft"

# lowest first; a module imports only from its own layer or below
LAYERS = [
    ("ops", ["visionpeft.ops"]),
    ("core", ["visionpeft.core"]),
    ("methods", ["visionpeft.methods"]),
    ("interop", ["visionpeft.interop"]),
    ("backbones/data", ["visionpeft.backbones", "visionpeft.data"]),
    ("api", ["visionpeft.files", "visionpeft"]),  # the package root is the public API
    ("train", ["visionpeft.train"]),
    ("pipelines", ["visionpeft.pipelines"]),
    ("front ends", ["visionpeft.cli", "visionpeft.__main__", "scripts", "demos"]),
]
# what pipelines, scripts and demos may import: public names only
PUBLIC = ("visionpeft", "visionpeft.train", "visionpeft.backbones", "visionpeft.data", "visionpeft.pipelines",
          "visionpeft.cli")
# an upward import kept on purpose, with the reason; nothing else may go up
ALLOWED_UP = {
    ("visionpeft.train.task", "visionpeft.pipelines"):
        "a YAML task name is looked up after importing the pipelines package, whose recipes register "
        "themselves (by package, never by recipe); visionpeft.train.DreamBoothTask's deprecation path uses it",
    ("visionpeft.train.dreambooth", "visionpeft.pipelines.dreambooth"):
        "the old module path, kept as a deprecation shim",
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> int:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            # the package root is its own layer; its submodules must each be listed
            inside = module == p or (p != "visionpeft" and module.startswith(p + "."))
            if inside and len(p) > best_len:
                best, best_len = i, len(p)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def _imports(path: Path):
    """(line, imported module) for every import in the file, relative ones resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == \
                "import_module" and node.args and isinstance(node.args[0], ast.Constant):
            yield node.lineno, node.args[0].value  # importlib.import_module("visionpeft....")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            # `from pkg import sub` may name a submodule: count the deepest that exists
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                is_module = (ROOT / Path(*sub.split("."))).with_suffix(".py").is_file() or \
                    (ROOT / Path(*sub.split("."))).is_dir()
                yield node.lineno, sub if is_module else target


def _sources():
    files = sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "scripts").glob("*.py")) + \
        sorted((ROOT / "demos").glob("*.py"))
    return [f for f in files if "__pycache__" not in f.parts]


def _ours(target: str) -> bool:
    return target == "visionpeft" or target.startswith("visionpeft.")


def test_no_layer_imports_a_higher_one():
    bad = []
    for path in _sources():
        src = _module_name(path)
        for line, target in _imports(path):
            if not _ours(target):
                continue
            if _layer(target) > _layer(src) and not any(
                    (src == a or src.startswith(a + ".")) and (target == b or target.startswith(b + "."))
                    for a, b in ALLOWED_UP):
                bad.append(f"{path.relative_to(ROOT)}:{line} ({LAYERS[_layer(src)][0]}) imports {target} "
                           f"({LAYERS[_layer(target)][0]})")
    assert not bad, "imports into a higher layer:\n" + "\n".join(bad)


def test_core_and_interop_never_import_a_method():
    bad = []
    for path in sorted((PACKAGE / "core").rglob("*.py")) + sorted((PACKAGE / "interop").rglob("*.py")):
        for line, target in _imports(path):
            if target == "visionpeft.methods" or target.startswith("visionpeft.methods."):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "shared code importing methods (ask the registry instead):\n" + "\n".join(bad)


def test_every_module_is_in_a_layer():
    for path in _sources():
        _layer(_module_name(path))  # asserts with the module's name


def test_methods_never_import_each_other():
    bad = []
    for path in sorted((PACKAGE / "methods").glob("*.py")):
        if path.name == "__init__.py":
            continue  # the registration list
        src = _module_name(path)
        for line, target in _imports(path):
            if target.startswith("visionpeft.methods") and target != src:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "methods importing methods:\n" + "\n".join(bad)


def test_pipelines_scripts_demos_and_the_cli_use_only_public_names():
    bad = []
    files = sorted((PACKAGE / "pipelines").rglob("*.py")) + sorted((ROOT / "scripts").glob("*.py")) + \
        sorted((ROOT / "demos").glob("*.py")) + [PACKAGE / "cli.py", PACKAGE / "__main__.py"]
    for path in files:
        for line, target in _imports(path):
            if _ours(target) and not any(target == p or target.startswith(p + ".") for p in PUBLIC[1:]) \
                    and target != "visionpeft":
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "imports past the public API (use `import visionpeft as vp`):\n" + "\n".join(bad)


def _method_parameter_names() -> set[str]:
    """Names of every registered method's parameters and submodules (each built, with
    its defaults, on a small layer), less the generic ``weight`` / ``bias``."""
    from torch import nn

    names = set()
    for method in vp.list_methods():
        spec = vp.get_method(method)
        model = nn.Sequential(nn.Linear(96, 96))
        # Point-PEFT's defaults prompt 6 blocks and train the host's norm and head: one block here
        kw = {"prompt_blocks": [0], "modules_to_save": []} if method == "point_peft" else {}
        vp.inject(model, spec.config_cls(target_modules=["0"], **kw), name="x")
        for pname, _ in model.named_parameters():
            if ".adapters.x." in pname:
                names.update(pname.split(".adapters.x.", 1)[1].split(".")[1:])  # after the part
    return names - {"weight", "bias"}


def test_core_and_interop_never_touch_a_methods_parameters_or_classes():
    params = _method_parameter_names()
    # LoRA's, KronA's, LoHa's, the Adapter's: the check has teeth
    assert {"lora_A", "lora_B", "A", "B", "hada_w1_a", "down", "up"} <= params
    classes = {vp.get_method(m).config_cls.__name__ for m in vp.list_methods()} | \
        {vp.get_method(m).module_cls.__name__ for m in vp.list_methods()}
    # interop's own LoRA-layout dataclass (Factors) has fields down / up too: by name they
    # cannot be told from the Adapter's submodules there, so interop is checked without them
    own = {"interop": {f.name for f in dataclasses.fields(Factors)}, "core": set()}
    bad = []
    for path in sorted((PACKAGE / "core").rglob("*.py")) + sorted((PACKAGE / "interop").rglob("*.py")):
        names = params - own[path.relative_to(PACKAGE).parts[0]]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in names:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} reads .{node.attr}")
            if isinstance(node, ast.Name) and node.id in classes:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} names {node.id}")
    assert not bad, "shared code reaching into methods:\n" + "\n".join(bad)


@pytest.mark.parametrize("layer", [name for name, _ in LAYERS])
def test_the_readme_draws_every_layer(layer):
    readme = (ROOT / "README.md").read_text()
    assert layer in readme.split("## Architecture", 1)[-1]
