"""MkDocs hook: the gallery. Each ``examples/*.py`` is run at build time and gets a page with its description,
its source, the output it printed and the figures it saved (PNG files written to its working directory).

An example that fails (non-zero exit) fails the build. Examples run in parallel (``FASTHESS_DOCS_JOBS``, default
2), with the Agg backend, in a fresh temporary directory each. For editing the pages (``mkdocs serve``),
``FASTHESS_GALLERY_CACHE=DIR`` keeps each example's results in DIR, keyed by a hash of its source, and reuses them.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
TIMEOUT_S = 300


def _examples() -> list[Path]:
    return sorted(EXAMPLES.glob("*.py"))


def _describe(path: Path) -> tuple[str, str, str, str]:
    """Title, subtitle, description and source without the docstring of an example.

    The docstring's first line is ``Title: subtitle.``; the rest of it is the description.
    """
    source = path.read_text()
    module = ast.parse(source)
    doc = ast.get_docstring(module) or path.stem
    first, _, rest = doc.partition("\n")
    title, _, subtitle = first.strip().rstrip(".").partition(": ")
    body = module.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        source = "\n".join(source.splitlines()[body[0].end_lineno:]).lstrip("\n")
    return title, subtitle, rest.strip(), source


def on_config(config):
    """Put one nav entry per example under the nav section named "Gallery"."""
    pages = [{_describe(p)[0]: f"gallery/{p.stem}.md"} for p in _examples()]
    for entry in config["nav"] or []:
        if isinstance(entry, dict) and "Gallery" in entry:
            entry["Gallery"] = [{"Overview": "gallery/index.md"}, *pages]
    return config


def _run(path: Path) -> tuple[Path, str, dict[str, bytes], float]:
    cache = os.environ.get("FASTHESS_GALLERY_CACHE")
    if not cache:
        return _execute(path)
    folder = Path(cache) / f"{path.stem}-{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"
    if not (folder / "run.json").is_file():
        _, stdout, figures, seconds = _execute(path)
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in figures.items():
            (folder / name).write_bytes(data)
        (folder / "run.json").write_text(json.dumps({"stdout": stdout, "seconds": seconds, "figures": list(figures)}))
    run = json.loads((folder / "run.json").read_text())
    return path, run["stdout"], {n: (folder / n).read_bytes() for n in run["figures"]}, run["seconds"]


def _execute(path: Path) -> tuple[Path, str, dict[str, bytes], float]:
    with tempfile.TemporaryDirectory(prefix=f"gallery-{path.stem}-") as cwd:
        env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(path)], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise PluginError(f"gallery: examples/{path.name} exited with {done.returncode}:\n{done.stderr[-4000:]}")
        figures = {p.name: p.read_bytes() for p in sorted(Path(cwd).glob("*.png"))}
    return path, done.stdout, figures, seconds


def _page(path: Path, stdout: str, figures: dict[str, bytes], seconds: float) -> str:
    title, subtitle, text, source = _describe(path)
    parts = [f"# {title}", "", f"**{subtitle[:1].upper() + subtitle[1:]}.**" if subtitle else "", "", text, "",
             f"Run it with `python examples/{path.name}`. The output and figures below are what it produced when "
             f"these pages were built ({seconds:.0f} s on the build machine's CPU).", "",
             "```python", source.rstrip(), "```", "", "## Output", "", "```text", stdout.rstrip(), "```"]
    for name in figures:
        parts += ["", f"![{name}]({path.stem}/{name})"]
    return "\n".join(parts) + "\n"


def _index() -> str:
    lines = ["# Gallery", "",
             "Small scripts from `examples/`, each run when these pages are built: what you see below each one is "
             "what it printed and plotted on the build machine (CPU).", ""]
    for p in _examples():
        title, subtitle, _, _ = _describe(p)
        lines.append(f"- [{title}]({p.stem}.md)" + (f": {subtitle}." if subtitle else ""))
    return "\n".join(lines) + "\n"


def on_files(files: Files, config) -> Files:
    jobs = int(os.environ.get("FASTHESS_DOCS_JOBS", "2"))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(_run, _examples()))
    files.append(File.generated(config, "gallery/index.md", content=_index()))
    for path, stdout, figures, seconds in results:
        files.append(File.generated(config, f"gallery/{path.stem}.md", content=_page(path, stdout, figures, seconds)))
        for name, data in figures.items():
            files.append(File.generated(config, f"gallery/{path.stem}/{name}", content=data))
    return files
