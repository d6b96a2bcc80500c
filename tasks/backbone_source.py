"""The backbone stage: `backbone.spec` resolved once per run into `artifacts/backbone/`.

- `mlflow:models:/<name>@<alias>`: the alias is resolved to one version, whose
  classifier is downloaded into `artifacts/backbone/classifier/`; when the
  spec names the pretrain flow's own model, `pretrained_is_current` tells the
  wiring (flows/pretrain.py:ensure_pretrained) whether to (re)build it first;
- `file:<path>` and `hf:<local dir>`: the content hash of the weights is recorded;
- `hf:<hub id>`: the id (and `@revision`, if given) is recorded;
- `efficientnet:<variant>`: the installed weight package, its version and the
  weight file's sha256 (another version of the package reruns fine-tuning);
- `builtin:*`: the spec alone.

`source.json` records what was resolved, so the finetune stage's cache key
(and DVC's) covers the weights actually loaded, and nothing resolves the
alias a second time in the same run. The folder is rewritten only when that
record changes, so an unchanged backbone keeps every downstream stage cached.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from distilflow.errors import DistilflowError
from distilflow.hashing import params_hash, path_hash
from distilflow.io import atomic_dir
from distilflow.params import BackboneParams, PretrainParams
from distilflow.records import StageResult
from tasks.backbones import split_hf_ref
from tasks.efficientnet import weights_file

SOURCE = "source.json"


def pretrain_fingerprint(pretrain: PretrainParams, seed: int) -> str:
    """What the registered pretrained model was built from; a change means pretrain again."""
    return params_hash({"pretrain": pretrain.model_dump(mode="json"), "seed": seed})


def _record(spec: BackboneParams, tracker) -> tuple[dict, Path | None]:
    """(what the spec resolves to, a folder to copy in or None), resolving an alias once."""
    kind, _, ref = spec.spec.partition(":")
    if kind == "mlflow":
        mv, local = tracker.download(ref)
        return {"spec": spec.spec, "resolved": f"models:/{mv.name}/{mv.version}", "run_id": mv.run_id}, local
    if kind in ("file", "hf") and Path(ref).exists():
        return {"spec": spec.spec, "resolved": str(Path(ref).resolve()), "content_md5": path_hash(Path(ref))}, None
    if kind == "hf":  # a hub id: its identity is the revision it is pinned to (`hf:org/name@rev`), if any
        repo, revision = split_hf_ref(ref)
        return {"spec": spec.spec, "repo": repo, "revision": revision or "unpinned (write hf:<id>@<revision>)"}, None
    if kind == "efficientnet":
        return {"spec": spec.spec, **weights_file(ref)[1]}, None
    return {"spec": spec.spec}, None


def backbone_stage(
    backbone: Path, spec: BackboneParams, pretrain: PretrainParams, seed: int, tracker=None
) -> StageResult:
    """Resolve `spec` into `backbone/` (see the module docstring); `tracker` is needed for `mlflow:` specs.

    `pretrain` and `seed` are what the demo's pretrained backbone is built from: part of the key, so a
    rebuilt one (a new version behind the alias) reruns what depends on it.
    """
    kind, _, _ = spec.spec.partition(":")
    if kind == "mlflow" and tracker is None:
        raise DistilflowError(f"backbone.spec {spec.spec} needs an MLflow tracking store to resolve")
    record, files = _record(spec, tracker)
    current = backbone / SOURCE
    if not current.is_file() or json.loads(current.read_text()) != record:
        with atomic_dir(backbone) as tmp:
            if files is not None:
                found = sorted(Path(files).rglob("arch.json"))
                if not found:
                    raise DistilflowError(
                        f"backbone.spec {spec.spec}: the registered model holds no distilflow arch.json"
                    )
                shutil.copytree(found[0].parent, tmp / "classifier")
            (tmp / SOURCE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    tags = {"backbone.spec": spec.spec, **({"backbone.version": record["resolved"]} if "resolved" in record else {})}
    return StageResult(tags=tags, info=record)


def pretrained_is_current(spec: BackboneParams, pretrain: PretrainParams, seed: int, tracker) -> bool:
    """False when `spec` names the pretrain flow's model and that is missing or was built from other params."""
    ref = spec.spec.removeprefix("mlflow:")
    if not spec.spec.startswith("mlflow:") or not ref.startswith(f"models:/{pretrain.registered_model}@"):
        return True
    mv = tracker.model_version(ref)
    return mv is not None and mv.tags.get("pretrain_fingerprint") == pretrain_fingerprint(pretrain, seed)
