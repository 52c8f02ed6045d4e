"""`amrseg run`: the stages of one experiment file, in order, with a report.

An experiment is a YAML file (the packaged ones: amrseg/experiments/*.yaml, `amrseg run --list`):

    description: one line
    vars:                       # values the steps refer to as ${name} or ${a.b}; --set a.b=... sets them
      data: {root: null}        # null: must be set on the command line
    steps:
      - stage: train-cam        # the command
        name: train-cam         # unique step name (default: the command; needed when a command repeats)
        out: cam                # its output (a run directory, a folder, a file): relative = in the experiment folder
        preset: amr-block       # train-cam only
        data_root: ${data.root} # every other key is a field of the stage's config (train-*: of the run config)
        train: {epochs: 3}

Each step's config is resolved like the command's own (defaults < the file < `--set STEP.KEY=VALUE`),
validated, and written with its summary to EXP/steps/<name>.json when the step finishes. A re-run
skips the finished steps whose config is unchanged, resumes an interrupted training run from its
checkpoint, and lets the per-image stages finish what is missing; a finished step whose config
changed is refused, naming the differences. After every step, EXP/report.html and report.json
are written anew.
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

from .config import flatten, parse_set, read_yaml
from .errors import AmrsegError, one_line
from .fileio import check_writable_dir, write_text
from .outputs import differences
from .stages import STAGES

EXPERIMENT_DIR = Path(__file__).parent / "experiments"
STEP_KEYS = ("stage", "name", "out", "preset")  # the step's own keys; the others are its config
# Config fields that hold paths: a relative path is taken in the experiment folder.
PATH_KEYS = {"out", "data", "data_root", "cams", "run", "irn", "labels", "ir_labels", "pred", "save", "input",
             "metrics", "pretrained", "init_spotlight", "art", "fmnist", "dir"}
_VAR = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")


def list_experiments() -> list[tuple[str, str]]:
    """(name, description) of every packaged experiment."""
    return [(p.stem, str(read_yaml(p).get("description", ""))) for p in sorted(EXPERIMENT_DIR.glob("*.yaml"))]


def find_experiment(experiment: Union[str, Path]) -> Path:
    path = Path(experiment)
    # A folder is never the experiment: `make demo` leaves a folder named `demo` where it runs again.
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise AmrsegError(f"EXPERIMENT {experiment}: no such file")
        return path
    packaged = EXPERIMENT_DIR / f"{experiment}.yaml"
    if not packaged.is_file():
        known = ", ".join(name for name, _ in list_experiments())
        raise AmrsegError(f"EXPERIMENT {experiment}: not a file nor a packaged experiment (known: {known})")
    return packaged


def _substitute(value: Any, variables: dict, where: str) -> Any:
    """${name} and ${a.b} in the strings of `value`, from `variables` (a whole-string reference keeps its type)."""
    if isinstance(value, dict):
        return {k: _substitute(v, variables, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, variables, where) for v in value]
    if not isinstance(value, str):
        return value
    flat = flatten(variables)

    def lookup(name: str) -> Any:
        if name not in flat:
            raise AmrsegError(f"{where}: ${{{name}}} is not a variable of the experiment "
                              f"(vars: {', '.join(sorted(flat)) or 'none'})")
        if flat[name] is None:
            raise AmrsegError(f"{where}: needs ${{{name}}}: give it with --set {name}=...")
        return flat[name]

    whole = _VAR.fullmatch(value)
    if whole:
        return lookup(whole.group(1))
    return _VAR.sub(lambda m: str(lookup(m.group(1))), value)


def _in(exp_dir: Path, key: str, value: Any) -> Any:
    """A path field relative to the experiment folder (keywords, URLs and absolute paths stay)."""
    if key not in PATH_KEYS or not isinstance(value, str) or not value or "://" in value \
            or value in ("imagenet", "none") or Path(value).is_absolute():
        return value
    return str((exp_dir / value).resolve())


def _deep_update(base: dict, updates: dict) -> dict:
    out = dict(base)
    for k, v in updates.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclasses.dataclass
class Step:
    name: str
    command: str
    out: Optional[str]  # a training step's run directory
    config: Any  # the resolved config dataclass


def plan(spec: dict, exp_dir: Path, overrides: list[str], where: str) -> list[Step]:
    """The experiment's steps with their resolved configs (`--set` items applied, variables filled)."""
    steps = spec.get("steps")
    if not isinstance(steps, list) or not steps:
        raise AmrsegError(f"{where}: expected a non-empty list 'steps'")
    names = []
    for i, step in enumerate(steps):
        if not isinstance(step, dict) or step.get("stage") not in STAGES:
            raise AmrsegError(f"{where}: step {i + 1}: 'stage' must be one of {', '.join(STAGES)}")
        names.append(str(step.get("name", step["stage"])))
    doubles = sorted({n for n in names if names.count(n) > 1})
    if doubles:
        raise AmrsegError(f"{where}: step names must be unique; give 'name' to the steps {', '.join(doubles)}")
    variables = dict(spec.get("vars") or {})
    by_step: dict[str, list[str]] = {}
    for item in overrides or []:
        head = item.split("=", 1)[0].split(".", 1)
        if head[0] in names and len(head) == 2:
            by_step.setdefault(head[0], []).append(item.split(".", 1)[1])
        else:
            key = item[5:] if item.startswith("vars.") else item
            variables = _deep_update(variables, parse_set([key]))
    known = set(flatten(spec.get("vars") or {}))
    unknown = [k for k in flatten(variables) if k not in known]
    if unknown:
        raise AmrsegError(f"--set {unknown[0]}: neither a step name ({', '.join(names)}) nor a variable of the "
                          f"experiment ({', '.join(sorted(known)) or 'none'})")
    out = []
    for name, step in zip(names, steps):
        step = _substitute(step, variables, f"{where}: step {name}")
        stage = STAGES[step["stage"]]
        body = {k: _in(exp_dir, k, v) for k, v in step.items() if k not in STEP_KEYS}
        body = {k: ({kk: _in(exp_dir, kk, vv) for kk, vv in v.items()} if isinstance(v, dict) else v)
                for k, v in body.items()}
        target = _in(exp_dir, "out", step.get("out")) if step.get("out") is not None else None
        if stage.trains and target is None:
            raise AmrsegError(f"{where}: step {name}: a training step needs 'out' (its run directory)")
        if not stage.trains and target is not None:
            body["out"] = target
        try:
            cfg = stage.resolve(body, by_step.get(name, []), step.get("preset") or "amr")
        except AmrsegError as e:
            raise AmrsegError(f"{where}: step {name}: {e}") from None
        out.append(Step(name, step["stage"], target, cfg))
    return out


def _outputs(step: Step) -> dict:
    cfg = step.config
    if STAGES[step.command].trains:
        return {"run": step.out}
    kinds = {"make-cam": "cams", "visualize": "gallery", "pseudo-labels": "labels", "predict": "pred",
             "build-scenes": "data", "pretrain-backbone": "weights"}
    found = {kinds[step.command]: cfg.out} if step.command in kinds else {}
    if step.command == "eval-seg" and cfg.save:
        found["pred"] = cfg.save
    return found


def _plain(cfg: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def run_step(step: Step, show_progress: Optional[bool]) -> dict:
    """Runs one step (training: resumed from its checkpoint when there is one); returns its summary."""
    module = STAGES[step.command].load()
    if STAGES[step.command].trains:
        run_dir = Path(step.out)
        return _train(step.config, run_dir, run_dir / "model.pt",
                      lambda resume: module.run(step.config, run_dir, resume=resume, show_progress=show_progress))
    if step.command == "pretrain-backbone":
        return _train(step.config.recipe(), module.run_dir(step.config), Path(step.config.out),
                      lambda resume: module.run(step.config, show_progress=show_progress, resume=resume))
    result = module.run(step.config, show_progress=show_progress)
    return result[0] if isinstance(result, tuple) else result


def _train(cfg: Any, run_dir: Path, product: Path, train: Callable[[bool], dict]) -> dict:
    """A step that trains the run `cfg` in `run_dir` on the shared loop and writes `product` at its end.

    - `product` there (killed before its record was written): finished, once the saved config is
      found to be `cfg` (else one line naming the differences);
    - a checkpoint there: resumed;
    - only the config and log of a run killed before its first checkpoint: started again, under the
      same condition;
    - a run stopped before its end (Ctrl-C): KeyboardInterrupt, as the command's exit 130.
    """
    import shutil

    from .engine.trainer import RUN_FILES, check_resume

    if product.is_file():
        check_resume(cfg, run_dir)
        return {"finished": True, "out": str(product)}
    resume = (run_dir / "checkpoint.pt").is_file()
    found = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    if found and not resume:
        check_resume(cfg, run_dir)
        for path in found:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    summary = train(resume)
    if not summary.get("finished", True):
        raise KeyboardInterrupt
    return summary


def run_experiment(experiment: Union[str, Path], out: Optional[Union[str, Path]] = None,
                   overrides: Optional[list[str]] = None, until: Optional[str] = None,
                   show_progress: Optional[bool] = None, log=None) -> dict:
    """Runs the steps of an experiment file (or packaged name) into `out` (default runs/<name>)."""
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    path = find_experiment(experiment)
    spec = read_yaml(path)
    name = path.stem
    exp_dir = Path(out) if out else Path("runs") / name
    check_writable_dir(exp_dir, "--out")
    exp_dir.mkdir(parents=True, exist_ok=True)
    steps = plan(spec, exp_dir.resolve(), overrides or [], str(path))
    if until is not None:
        stops = [i for i, s in enumerate(steps) if s.name == until or s.command == until]
        if not stops:
            raise AmrsegError(f"--until {until}: no step of that name or command (steps: "
                              f"{', '.join(s.name for s in steps)})")
        steps = steps[:stops[0] + 1]
    for step in steps:  # a finished step whose config changed stops the run before any work
        done = exp_dir / "steps" / f"{step.name}.json"
        if done.is_file():
            old = json.loads(done.read_text()).get("config")
            if old != _plain(step.config):
                raise AmrsegError(f"step {step.name}: finished with another config "
                                  f"({'; '.join(differences(flatten(old or {}), flatten(_plain(step.config))))}); use another --out, or delete "
                                  f"{done} and its outputs")
    records: list[dict] = []
    record = {"experiment": name, "file": str(path.resolve()), "out": str(exp_dir.resolve()), "stages": records,
              "runs": {}}
    for number, step in enumerate(steps, 1):
        config = _plain(step.config)
        done = exp_dir / "steps" / f"{step.name}.json"
        entry = {"name": step.name, "command": step.command, "config": config,
                 "outputs": {k: _relative(v, exp_dir) for k, v in _outputs(step).items()}}
        if STAGES[step.command].trains:
            record["runs"][step.name] = entry["outputs"]["run"]
        elif step.command == "pretrain-backbone":  # its loss curve: the run folder beside the weights
            record["runs"][step.name] = _relative(str(STAGES[step.command].load().run_dir(step.config)), exp_dir)
        if done.is_file():
            old = json.loads(done.read_text())
            entry.update(status="skipped (finished)", seconds=old.get("seconds"), summary=old.get("summary"))
            log(f"== {number}/{len(steps)} {step.name}: finished before")
        else:
            log(f"== {number}/{len(steps)} {step.name}")
            t0 = time.monotonic()
            try:
                summary = run_step(step, show_progress)
            except AmrsegError as e:
                raise AmrsegError(f"step {step.name}: {one_line(e)}") from None
            entry.update(status="done", seconds=round(time.monotonic() - t0, 1), summary=summary)
            write_text(done, json.dumps({"config": config, "summary": summary, "seconds": entry["seconds"]},
                                        indent=1) + "\n")
        records.append(entry)
        report = write_report(exp_dir, record)
    log(figures_table(records))
    return {"experiment": name, "out": str(exp_dir), "report": report,
            "steps": [{"name": e["name"], "status": e["status"], "seconds": e["seconds"]} for e in records]}


def figures_table(records: list[dict]) -> str:
    """The steps' figures as a markdown table (report.html has the full one)."""
    pct = lambda v: "-" if not isinstance(v, (int, float)) else f"{100 * v:.1f}"  # noqa: E731
    rows = ["| step | split | figure | seconds |", "|---|---|---|---|"]
    for e in records:
        s, cfg = e.get("summary") or {}, e.get("config") or {}
        if "miou" in s and s["miou"] is not None:
            figure = f"mIoU {pct(s['miou'])}" + (f" (threshold {s['threshold']:.2f})" if "threshold" in s else "")
        elif s.get("confident_precision") is not None:
            figure = (f"{pct(s['confident_precision'])}% right of the {pct(s.get('confident_fraction'))}% "
                      f"confident pixels")
        elif "test_accuracy" in s:
            figure = f"top-1 {pct(s['test_accuracy'])}% on single items"
        else:
            figure = ""
        seconds = "-" if e.get("seconds") is None else f"{e['seconds']:.0f}"
        rows.append(f"| {e['name']} | {cfg.get('split', '')} | {figure} | {seconds} |")
    return "\n".join(rows)


def _relative(value: Optional[str], exp_dir: Path) -> Optional[str]:
    if value is None:
        return None
    try:
        return str(Path(value).resolve().relative_to(exp_dir.resolve()))
    except ValueError:
        return str(value)


def write_report(exp_dir: Path, record: dict) -> Optional[str]:
    """report.html and report.json (amrseg.report); returns the page's path."""
    from .report import write_report as write

    html_path, _ = write(exp_dir, record)
    return str(html_path)
