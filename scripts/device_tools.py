"""Helpers of scripts/device_run.sh (a prepared GPU run); standard library only at import,
so that the bookkeeping works even where torch or the package does not import.

    python scripts/device_tools.py install --wheels .whl --site SITE --out FILE
    python scripts/device_tools.py env --out FILE [--dry-run]
    python scripts/device_tools.py check --work WORK MODULE...
    python scripts/device_tools.py junit --xml FILE --out FILE [--dry-run]
    python scripts/device_tools.py record --work WORK --outdir OUTDIR --name NAME --status STATUS ...
    python scripts/device_tools.py report --work WORK --outdir OUTDIR

Also a pytest plugin (``-p device_tools`` with scripts/ on the path): it keeps only the
tests that need CUDA, i.e. those named ``*cuda*`` or carrying a skipif marker whose
reason names CUDA, so that the GPU run picks up new CUDA tests without being edited.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

# what the versions table shows (distribution names)
PACKAGES = ["torch", "triton", "torchvision", "timm", "peft", "diffusers", "transformers", "huggingface-hub",
            "accelerate", "safetensors", "numpy", "PyWavelets", "pytest", "visionpeft"]
# modules whose import is tried once in a real run, so that a step needing a broken one is
# skipped with the reason instead of failing after minutes
IMPORT_CHECKS = ["pywt", "visionpeft", "timm", "peft", "diffusers", "triton"]
LOG_TAIL_LINES = 60


# --- the pytest plugin -----------------------------------------------------------------
def _needs_cuda(item) -> bool:
    if item.path.name == "test_device_run.py":  # the dry run's own test: never run it from inside a run
        return False
    if "cuda" in item.name.lower():
        return True
    for mark in item.iter_markers("skipif"):
        if "cuda" in str(mark.kwargs.get("reason", "")).lower():
            return True
    return False


def pytest_collection_modifyitems(config, items):
    keep = [it for it in items if _needs_cuda(it)]
    drop = [it for it in items if not _needs_cuda(it)]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


# --- small utilities ---------------------------------------------------------------------
def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _packaging():
    """packaging's version and requirement classes: the package, else pip's vendored copy."""
    try:
        from packaging.requirements import Requirement
        from packaging.version import Version
    except ImportError:  # pragma: no cover - only where packaging itself is missing
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.version import Version
    return Requirement, Version


def _installed() -> dict[str, str]:
    out = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            out.setdefault(_norm(name), dist.version)  # the first on sys.path wins, as for import
    return out


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)  # a reader (or a kill) never sees half a file


# --- install: the carried wheels the device lacks ----------------------------------------
def _wheel_info(path: Path) -> tuple[str, str]:
    dist, version = path.name.split("-")[:2]
    return _norm(dist), version


def _wheel_requires(path: Path) -> list:
    """The wheel's unconditional requirements (extras and false markers left out)."""
    Requirement, _ = _packaging()
    with zipfile.ZipFile(path) as zf:
        meta = next((n for n in zf.namelist() if n.endswith(".dist-info/METADATA")), None)
        text = zf.read(meta).decode("utf-8", "replace") if meta else ""
    reqs = []
    for line in text.splitlines():
        if not line.lower().startswith("requires-dist:"):
            continue
        try:
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                reqs.append(req)
        except Exception:  # an unparsable line: not ours to judge
            continue
    return reqs


def choose_wheels(wheels: list[Path], installed: dict[str, str]) -> tuple[list[dict], list[dict]]:
    """(to install, kept): a carried distribution is installed only where the device lacks
    it (never shadowing what the device has); of several carried versions, the newest whose
    requirements do not clash with a version the device has (e.g. diffusers' bound on
    huggingface-hub), else the newest with the clash noted."""
    _, Version = _packaging()
    groups: dict[str, list[tuple]] = {}
    for w in wheels:
        dist, version = _wheel_info(w)
        groups.setdefault(dist, []).append((Version(version), w))
    chosen, kept = [], []
    for dist, cands in sorted(groups.items()):
        cands.sort(key=lambda c: c[0], reverse=True)
        if dist in installed:
            kept.append({"dist": dist, "device_version": installed[dist],
                         "carried": [str(v) for v, _ in cands]})
            continue
        pick = None
        for version, path in cands:
            clash = [f"{r} (device has {installed[_norm(r.name)]})" for r in _wheel_requires(path)
                     if _norm(r.name) in installed
                     and not r.specifier.contains(installed[_norm(r.name)], prereleases=True)]
            missing = [str(r) for r in _wheel_requires(path)
                       if _norm(r.name) not in installed and _norm(r.name) not in groups]
            entry = {"dist": dist, "version": str(version), "file": path.name, "clash": clash, "missing": missing}
            if not clash:
                pick = entry
                break
            pick = pick or entry  # the newest, should every version clash
        chosen.append(pick)
    return chosen, kept


def _unzip_install(paths: list[Path], site: Path) -> None:
    """What ``pip install --target`` does for plain wheels, where pip is missing: members
    that would land outside ``site``, in our package's link, or in a ``.data`` folder are
    refused (such a wheel needs pip)."""
    for p in paths:
        with zipfile.ZipFile(p) as zf:
            names = zf.namelist()
            bad = [n for n in names if n.startswith(("/", "visionpeft/")) or ".." in Path(n).parts
                   or ".data/" in n]
            if bad:
                raise OSError(f"{p.name}: cannot unpack {bad[0]} without pip")
            zf.extractall(site)


def cmd_install(args) -> int:
    wheels_dir, site = Path(args.wheels), Path(args.site)
    record = {"wheels_dir": str(wheels_dir), "site": str(site), "carried": [], "installed": [], "kept": [],
              "method": None, "error": None}
    wheels = sorted(wheels_dir.glob("*.whl")) if wheels_dir.is_dir() else []
    record["carried"] = [w.name for w in wheels]
    if not wheels:
        print(f"install: no wheels in {wheels_dir} (make them with scripts/device_wheels.sh); using what is installed")
    else:
        chosen, kept = choose_wheels(wheels, _installed())
        record["kept"] = kept
        for k in kept:
            print(f"install: {k['dist']} {k['device_version']} is here already; carried {k['carried']} left out")
        if chosen:
            site.mkdir(parents=True, exist_ok=True)
            paths = [wheels_dir / c["file"] for c in chosen]
            pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                  "--no-compile", "--target", str(site), *map(str, paths)],
                                 capture_output=True, text=True)
            record["method"] = "pip"
            if pip.returncode != 0 and "No module named pip" not in pip.stderr:
                record["error"] = f"pip refused the wheels: {pip.stderr.strip().splitlines()[-1:]}"
                print(f"install: {record['error']}")
            elif pip.returncode != 0:
                print(f"install: pip failed ({pip.stderr.strip().splitlines()[-1:]}); unpacking the wheels instead")
                try:
                    _unzip_install(paths, site)
                    record["method"] = "unzip"
                except (OSError, zipfile.BadZipFile) as e:
                    record["error"] = f"{type(e).__name__}: {e}"
            for c in chosen:
                clash = f"; its requirements clash: {', '.join(c['clash'])}" if c["clash"] else ""
                print(f"install: {c['dist']} {c['version']} from {c['file']} (absent here){clash}")
            record["installed"] = chosen
    if args.out:
        _write_json(Path(args.out), record)
    return 0


# --- env: versions, GPU, imports ------------------------------------------------------------
def _version(dist: str):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _import_checks(modules: list[str], timeout: float = 90) -> dict:
    """Each module imported in a fresh interpreter of its own (one broken import must not
    hide the next), all at once (a GPU machine has the cores); the last line of the error
    where one fails."""
    procs = {mod: subprocess.Popen([sys.executable, "-c", f"import {mod}"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True) for mod in modules}
    out, deadline = {}, time.monotonic() + timeout
    for mod, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            out[mod] = f"import still running after {timeout:.0f}s"
            continue
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        out[mod] = "ok" if proc.returncode == 0 else (lines[-1] if lines else f"exit {proc.returncode}")
    return out


def cmd_env(args) -> int:
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "dry_run": args.dry_run,
            "python": sys.version.split()[0], "executable": sys.executable,
            "platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "packages": {p: _version(p) for p in PACKAGES}, "nvidia_smi": None, "torch": None, "imports": None}
    smi = shutil.which("nvidia-smi")
    if smi:
        r = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,memory.used,compute_cap",
                            "--format=csv,noheader"], capture_output=True, text=True)
        info["nvidia_smi"] = r.stdout.strip() or r.stderr.strip()
    if not args.dry_run:  # a dry run's steps import all of this anyway; a real run wants reasons early
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:  # torch's CUDA init beside the import checks
            torch_info = pool.submit(_torch_info) if _version("torch") else None
            info["imports"] = _import_checks(IMPORT_CHECKS)
            info["torch"] = torch_info.result() if torch_info else None
    for k in ("python", "executable", "platform", "cpus", "nvidia_smi", "torch", "imports"):
        print(f"env: {k}: {info[k]}")
    print("env: packages: " + ", ".join(f"{k} {v}" for k, v in info["packages"].items()))
    _write_json(Path(args.out), info)
    return 0


def _torch_info() -> dict:
    """torch's build and the GPU it sees, from a fresh interpreter (CUDA's first init may hang)."""
    try:
        r = subprocess.run([sys.executable, "-c", (
                "import json, torch\n"
                "d = {'version': torch.__version__, 'cuda': torch.version.cuda,\n"
                "     'cudnn': torch.backends.cudnn.version(), 'cuda_available': torch.cuda.is_available()}\n"
                "if d['cuda_available']:\n"
                "    d.update(gpu=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),\n"
                "             memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))\n"
                "print(json.dumps(d))")], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return {"error": "torch / CUDA init still running after 60s"}
    return _read_lines_json(r.stdout) or {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}


def _read_lines_json(text: str):
    for line in reversed(text.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def cmd_check(args) -> int:
    """Exit 0 when every module can be imported as far as we know (found on the path, and
    not among the env step's failed imports); else print why and exit 1."""
    env = _read_json(Path(args.work) / "env.json") or {}
    failed = {m: e for m, e in (env.get("imports") or {}).items() if e != "ok"}
    why = []
    for mod in args.modules:
        if importlib.util.find_spec(mod) is None:
            why.append(f"{mod} is not installed")
        elif mod in failed:
            why.append(f"{mod} does not import ({failed[mod]})")
    if why:
        print("; ".join(why) + (" - carry the wheels made by scripts/device_wheels.sh in .whl/"
                                if any(m in ("diffusers", "pywt", "visionpeft") for m in args.modules) else ""))
        return 1
    return 0


# --- junit: pytest's XML as JSON -------------------------------------------------------------
def cmd_junit(args) -> int:
    """Write pytest's report as JSON and print one line about it; exit 1 when pytest
    failed (``--rc``), or, with ``--require-pass`` (on the GPU), when no test passed or
    one was skipped (a CUDA test skipped on a GPU machine did not run)."""
    out = {"pytest_exit": args.rc, "passed": 0, "failed": 0, "skipped": 0, "errors": 0, "tests": []}
    try:
        root = ET.parse(args.xml).getroot()
    except (OSError, ET.ParseError) as e:
        out["error"] = f"no pytest report: {e}"
        _write_json(Path(args.out), out)
        print(f"pytest exit {args.rc}, {out['error']}")
        return 1
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "errors"}.get(tag, tag)
                message = (el.get("message") or el.text or "").strip().splitlines()[0][:300] if \
                    (el.get("message") or el.text) else ""
                break
        out[outcome] += 1
        out["tests"].append({"name": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                             "seconds": float(case.get("time") or 0), "message": message})
    _write_json(Path(args.out), out)
    line = f"{out['passed']} passed, {out['failed']} failed, {out['errors']} errors, {out['skipped']} skipped"
    bad = args.rc not in (0, None) or (args.require_pass and (out["passed"] == 0 or out["skipped"] > 0))
    skipped = [t["message"] for t in out["tests"] if t["outcome"] == "skipped"]
    print(line + (f" ({skipped[0]})" if skipped else "") + (f"; pytest exit {args.rc}" if args.rc else ""))
    return 1 if bad else 0


# --- record / report: run.json and summary.md ---------------------------------------------
def _tail(path: str | None) -> str:
    if not path:
        return ""
    try:
        lines = Path(path).read_text(errors="replace").replace("\r", "\n").splitlines()
    except OSError:
        return ""
    lines = [ln for ln in lines if ln.strip() and "it/s]" not in ln and "s/it]" not in ln]  # no progress bars
    return "\n".join(lines[-LOG_TAIL_LINES:])


def cmd_record(args) -> int:
    work = Path(args.work)
    step = {"name": args.name, "status": args.status, "seconds": round(args.seconds, 1),
            "timeout_s": args.timeout, "note": " ".join(args.note.split()), "command": args.command,
            "json": f"{args.name}.json", "log_tail": _tail(args.log)}
    with open(work / "steps.jsonl", "a") as fh:
        fh.write(json.dumps(step) + "\n")
    return cmd_report(args)


def _steps(work: Path) -> list[dict]:
    try:
        return [json.loads(ln) for ln in (work / "steps.jsonl").read_text().splitlines() if ln.strip()]
    except OSError:
        return []


def cmd_report(args) -> int:
    work, outdir = Path(args.work), Path(args.outdir)
    meta = _read_json(work / "meta.json") or {}
    env = _read_json(work / "env.json") or {}
    install = _read_json(work / "install.json") or {}
    steps = _steps(work)
    run = {**meta, "updated": time.strftime("%Y-%m-%d %H:%M:%S"), "env": env, "install": install, "steps": steps}
    if "start_epoch" in meta:
        run["elapsed_s"] = round(time.time() - meta["start_epoch"], 1)
    _write_json(outdir / "run.json", run)
    (outdir / "summary.md").write_text(render(run, outdir))
    return 0


def _fmt(x, nd=1):
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _table(head: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return out


def _iqr(v: dict) -> str:
    q = v.get("iqr") or [None, None]
    return f"{v.get('ratio')} [{q[0]}, {q[1]}]"


def _where(d: dict) -> str:
    return " ".join(str(x) for x in (d.get("device", "cpu"), d.get("gpu")) if x)


def _methods(d: dict) -> list[str]:
    out = [f"{_where(d)}, depth {d.get('depth')}, clock {d.get('clock')}"
           + (f", img {d['img']}" if "img" in d else "") + (f", width {d['width']}" if "width" in d else "")]
    for h in d.get("hosts", []):
        out += ["", f"host {h['host']}, batch {h['batch']}:", ""]
        step = h.get("step", {})
        rows = [[k, step.get(k, {}).get("ms"), step.get(k, {}).get("vs_peft_lora"), _iqr(step[k]) if k in step else "",
                 h["memory_mb"].get(k), h["peak_mb"].get(k), h["step_peak_mb"].get(k), h["trainable"].get(k)]
                for k in h["memory_mb"]]
        out += _table(["variant", "ms / step", "/ peft_lora", "/ lora [IQR]", "memory MB", "peak MB",
                       "step peak MB", "trainable"], rows)
    return out


def _dreambooth(d: dict) -> list[str]:
    out = [f"{_where(d)}, {d.get('unet')}, {d.get('resolution')} px, batch "
           f"{d.get('batch')}, {d.get('dtype')}, clock {d.get('clock')}", ""]
    step = d.get("step", {})
    rows = [[k, v.get("ms"), v.get("steps_per_s"), _iqr(v), d["memory_mb"].get(k), d["memory_vs_lora"].get(k),
             d["trainable"].get(k)] for k, v in step.items()]
    return out + _table(["variant", "ms / step", "steps / s", "/ lora [IQR]", "memory MB", "memory / lora",
                         "trainable"], rows)


def _cd(d: dict) -> list[str]:
    out = [f"{_where(d)}, image {d.get('image_size')} px, batch {d.get('batch')}"
           + (" (toy encoders)" if d.get("toy") else ""), ""]
    rows = []
    for enc, e in d.get("encoders", {}).items():
        for k, v in e["step"].items():
            rows.append([enc, k, v.get("ms"), _iqr(v), e["memory_mb"].get(k), e["trainable"].get(k)])
    out += _table(["encoder", "variant", "ms / step", "/ lora [IQR]", "memory MB", "trainable"], rows)
    tiles = ", ".join(f"{enc} {e.get('sliding_window_tiles_per_s')}" for enc, e in d.get("encoders", {}).items())
    return out + ["", f"sliding-window inference (LoRA), tiles / s: {tiles}"]


def _switch(d: dict) -> list[str]:
    out = [f"{_where(d)}, {d.get('host')}, {d.get('adapters')}", ""]
    counts = sorted({int(c) for c in (*d.get("visionpeft", {}), *d.get("diffusers", {}))})

    def cell(side, c):
        v = d.get(side, {}).get(str(c)) or d.get(side, {}).get(c)
        return f"{v['median_ms']} ms [{v['p90_ms']}]" if v else ""

    rows = [[str(c), cell("visionpeft", c), cell("diffusers", c)] for c in counts]
    return out + _table(["adapters loaded", "visionpeft median [p90]", "diffusers set_adapters median [p90]"], rows)


def _cuda_tests(d: dict) -> list[str]:
    out = [f"passed {d.get('passed')}, failed {d.get('failed')}, errors {d.get('errors')}, skipped {d.get('skipped')}"]
    if d.get("error"):
        out.append(d["error"])
    rows = [[t["name"], t["outcome"], t.get("seconds"), t.get("message", "").replace("|", "/")]
            for t in d.get("tests", [])]
    return out + ([""] + _table(["test", "outcome", "s", "message"], rows) if rows else [])


RENDER = {"cuda_tests": _cuda_tests, "methods": _methods, "methods_compiled": _methods, "dreambooth": _dreambooth,
          "switch": _switch, "cd": _cd}
WHAT = {"cuda_tests": "tests that need CUDA (picked by name or skip reason)",
        "methods": "ViT-B/16 training step, every method against our LoRA and PEFT's",
        "methods_compiled": "SNELL's compiled kernels (Triton on CUDA) against eager SNELL",
        "dreambooth": "SD1.5 UNet DreamBooth step, ours against the diffusers example's PEFT LoRA",
        "switch": "adapter switching cost with up to 100 LoRAs loaded",
        "cd": "PeftCD training step on Hiera-B+ and DINOv3 ViT-B, and sliding-window inference"}


def render(run: dict, outdir: Path) -> str:
    env = run.get("env") or {}
    tor = env.get("torch") or {}
    lines = [f"# Device run {'(dry run, CPU, toy sizes)' if run.get('dry_run') else '(GPU)'}", "",
             f"Code: commit {run.get('commit', '?')}. "
             f"Started {run.get('started', '?')}, updated {run.get('updated')}; time budget "
             f"{run.get('budget_s', '?')} s, {run.get('elapsed_s', '?')} s used so far.", "", "## Steps", ""]
    rows = [[s["name"], s["status"], s["seconds"], s.get("timeout_s"), (s.get("note") or "").replace("|", "/"),
             s["json"] if s.get("json") and (outdir / s["json"]).is_file() else ""] for s in run.get("steps", [])]
    lines += _table(["step", "status", "seconds", "timeout s", "note", "JSON"], rows)
    lines += ["", "## Environment", "",
              f"- python {env.get('python')} ({env.get('executable')}), {env.get('platform')}, {env.get('cpus')} CPUs",
              f"- torch {tor.get('version', env.get('packages', {}).get('torch'))}, CUDA {tor.get('cuda')}, "
              f"cuDNN {tor.get('cudnn')}, GPU {tor.get('gpu')} (capability {tor.get('capability')}, "
              f"{tor.get('memory_gib')} GiB)",
              f"- nvidia-smi: {env.get('nvidia_smi')}",
              "- packages: " + ", ".join(f"{k} {v}" for k, v in (env.get("packages") or {}).items()),
              ]
    if env.get("imports"):
        lines.append("- imports: " + ", ".join(f"{k} {v}" for k, v in env["imports"].items()))
    inst = run.get("install") or {}
    if inst:
        got = ", ".join(f"{c['dist']} {c['version']}" + (f" (clashes: {'; '.join(c['clash'])})" if c["clash"] else "")
                        for c in inst.get("installed", [])) or "none"
        lines.append(f"- carried wheels ({len(inst.get('carried', []))} in {inst.get('wheels_dir')}): installed "
                     f"{got}; the device's own kept for {', '.join(k['dist'] for k in inst.get('kept', [])) or 'none'}")
    for s in run.get("steps", []):
        lines += ["", f"## {s['name']}: {s['status']}", "", f"{WHAT.get(s['name'], '')}. Command: `{s.get('command')}`"]
        data = _read_json(outdir / s["json"]) if s.get("json") else None
        if data is not None and s["name"] in RENDER:
            try:
                lines += [""] + RENDER[s["name"]](data)
            except Exception as e:  # a surprise in one JSON must not lose the summary
                lines += ["", f"(could not tabulate {s['json']}: {type(e).__name__}: {e})"]
        if s["status"] != "ok" and s.get("log_tail"):
            tail = "\n".join(s["log_tail"].splitlines()[-20:])
            lines += ["", "Last lines of its output:", "", "```", tail, "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    s = sub.add_parser("install")
    s.add_argument("--wheels", required=True)
    s.add_argument("--site", required=True)
    s.add_argument("--out")
    s = sub.add_parser("env")
    s.add_argument("--out", required=True)
    s.add_argument("--dry-run", action="store_true")
    s = sub.add_parser("check")
    s.add_argument("--work", required=True)
    s.add_argument("modules", nargs="+")
    s = sub.add_parser("junit")
    s.add_argument("--xml", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--rc", type=int, default=None, help="pytest's exit status")
    s.add_argument("--require-pass", action="store_true")
    for name in ("record", "report"):
        s = sub.add_parser(name)
        s.add_argument("--work", required=True)
        s.add_argument("--outdir", required=True)
        if name == "record":
            s.add_argument("--name", required=True)
            s.add_argument("--status", required=True)
            s.add_argument("--seconds", type=float, default=0.0)
            s.add_argument("--timeout", type=int, default=None)
            s.add_argument("--note", default="")
            s.add_argument("--cmd", dest="command", default="")
            s.add_argument("--log")
    args = p.parse_args(argv)
    return {"install": cmd_install, "env": cmd_env, "check": cmd_check, "junit": cmd_junit,
            "record": cmd_record, "report": cmd_report}[args.action](args)


if __name__ == "__main__":
    sys.exit(main())
