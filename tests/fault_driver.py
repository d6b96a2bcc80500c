"""Run the CLI with a pause injected at one point, so a test can kill -9 the process exactly there.

    python -m tests.fault_driver STAGE|register|promote MARKER_FILE -- <distilflow CLI arguments>

- a stage name: pause just before that stage's function runs;
- `register`: pause at the first alias write of a registration, when its versions exist but are pending;
- `promote`: pause at the alias move of a promotion, after its intent and tags are recorded;
- `fail-<stage>`: that stage raises an error just before it runs (the rest of the run proceeds as usual).
The pause writes MARKER_FILE, then sleeps until the test kills the process. Nothing here ships:
it patches the running process only.
"""

import sys
import time
from pathlib import Path


def _pause(marker: Path):
    marker.write_text("paused\n")
    time.sleep(3600)


def main() -> int:
    point, marker, sep, *args = sys.argv[1:]
    assert sep == "--", "usage: python -m tests.fault_driver POINT MARKER -- CLI ARGS"
    marker = Path(marker)
    if point in ("register", "promote"):
        from mlflow.tracking import MlflowClient

        original = MlflowClient.set_registered_model_alias
        wanted = "challenger" if point == "register" else "champion"

        def set_alias(self, name, alias, version):
            if alias == wanted:
                _pause(marker)
            return original(self, name, alias, version)

        MlflowClient.set_registered_model_alias = set_alias
    else:
        from tasks import stage_runner

        original_call = stage_runner.call_stage

        def call(stage, kwargs):
            if stage.name == point:
                _pause(marker)
            if point == f"fail-{stage.name}":
                from distilflow.errors import DistilflowError

                raise DistilflowError(f"injected failure in {stage.name}")
            return original_call(stage, kwargs)

        stage_runner.call_stage = call
    from cli import main as cli

    return cli(args)


if __name__ == "__main__":
    raise SystemExit(main())
