"""`distilflow add-data FILE`: bring a new data file into the project, all or nothing.

1. inspect it (tasks/onboarding.py): nothing is written if it cannot be read;
2. copy it (or hard-link it, `--link`) to `data/raw/<name>`;
3. `dvc add` it when the project is a DVC repository (the copy is removed again if that fails);
4. write `params.<name>.yaml`: the project's params with the proposed `data:` (and `normalize:`),
   for the user to read, correct and run with `distilflow run --params params.<name>.yaml`. It is never
   a file the run would refuse: likely typos of a class are left out of `data.classes` (so their rows
   count as invalid labels), each named in a comment, rather than left for clean.similar_labels to stop.

When no column is clearly the label, step 1 stops and asks for `--label` (tasks/onboarding.py says how
the label is chosen).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from distilflow.errors import DistilflowError
from distilflow.io import write_text


def _name(path: Path, given: str | None) -> str:
    name = given or re.sub(r"[^A-Za-z0-9_.-]+", "-", path.stem).strip("-.").lower()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name or ""):
        raise DistilflowError(f"add-data: {name!r} cannot name the dataset; give --name (letters, digits, '_', '-')")
    return name


def _place(source: Path, target: Path, link: bool, force: bool) -> tuple[bool, Path | None]:
    """Copy or link `source` to `target`: (placed, the replaced file's backup if --force replaced one)."""
    backup = None
    if target.exists():
        if source.resolve() == target.resolve() or (
            target.stat().st_size == source.stat().st_size and _same(source, target)
        ):
            return False, None
        if not force:
            raise DistilflowError(f"add-data: {target} exists with other content; --force replaces it")
        backup = target.with_name(f".{target.name}.{os.getpid()}.bak")
        os.link(target, backup)  # put back if `dvc add` then fails
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        if link:
            try:
                os.link(source, tmp)
            except OSError as exc:
                raise DistilflowError(
                    f"add-data: cannot hard-link {source} into the project ({exc.strerror})"
                ) from None
        else:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        if backup is not None:
            backup.unlink(missing_ok=True)
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return True, backup


def _same(a: Path, b: Path) -> bool:
    from distilflow.hashing import file_md5

    return file_md5(a) == file_md5(b)


def _dvc_add(root: Path, target: Path) -> str:
    dvc = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")
    proc = subprocess.run(
        [dvc, "add", str(target.relative_to(root))], cwd=root, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        said = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        raise DistilflowError(
            f"add-data: `dvc add {target.relative_to(root)}` failed (nothing added): {(said or ['no output'])[-1]}"
        )
    return f"{target.relative_to(root)}.dvc"


def _note_typos(text: str, typos: list) -> str:
    """The params text with a comment above `data.classes` naming each likely typo it leaves out."""
    if not typos:
        return text
    notes = "".join(
        f"  # left out: {small!r} ({n_small} rows), one edit from {big!r} ({n_big} rows), a typo? Its rows count as "
        "invalid labels; add it here if it is a real class\n"
        for small, n_small, big, n_big in typos
    )
    return re.sub(r"(?m)^(data:\n(?:[ #].*\n)*?)(  classes:)", lambda m: m.group(1) + notes + m.group(2), text, count=1)


def add_data(args) -> int:
    """The command (see the module docstring)."""
    from tasks.onboarding import describe, inspect_file

    source = Path(args.file).expanduser()
    params_file = Path(args.params).resolve()
    if not params_file.is_file():
        raise DistilflowError(f"add-data: {params_file} not found (the params the proposal starts from)")
    root = params_file.parent
    report = inspect_file(source, args.label)
    name = _name(source, args.name)
    target = root / "data" / "raw" / f"{name}{source.suffix.lower()}"
    out = root / f"params.{name}.yaml"
    if out.exists() and not args.force:
        raise DistilflowError(f"add-data: {out} exists; --force rewrites it")
    for line in describe(report):
        print(line)
    placed, backup = _place(source, target, args.link, args.force)
    try:
        tracked = _dvc_add(root, target) if (root / ".dvc").is_dir() else None
    except BaseException:
        if backup is not None:
            os.replace(backup, target)  # the file --force replaced, as it was
        elif placed:
            target.unlink(missing_ok=True)
        raise
    if backup is not None:
        backup.unlink(missing_ok=True)
    raw = yaml.safe_load(params_file.read_text()) or {}
    raw["data"] = {
        **raw.get("data", {}),
        **report["data"],
        "source": str(target.relative_to(root)),
        "name": name,
    }
    raw["normalize"] = {**raw.get("normalize", {}), **report["normalize"]}
    for section, values in report["overrides"].items():
        raw[section] = {**raw.get(section, {}), **values}
    header = (
        f"# written by `distilflow add-data {source.name}`: check data:, normalize: and backbone:,\n"
        f"# then: python -m distilflow run --params {out.name}\n"
    )
    body = _note_typos(yaml.safe_dump(raw, sort_keys=False, default_flow_style=False), report["typos"])
    write_text(header + body, out)
    print(
        f"{'copied' if not args.link else 'linked'} to {target.relative_to(root)}"
        if placed
        else f"{target} already in place"
    )
    print(f"dvc: tracked by {tracked} (make push to share it)" if tracked else "dvc: not a DVC repository, not tracked")
    print(f"wrote {out.name}: check it, then `python -m distilflow run --params {out.name}`")
    return 0
