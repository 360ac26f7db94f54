"""Evaluating checkpoints: lm-evaluation-harness tasks and perplexity sets, one checkpoint at a time.

A checkpoint is a Hub id or local model directory (`path`), or an untrained model built from
`model_config` (the honest "before" of a model trained from scratch). Task names are checked
against lm-eval's registry (plus the recipe's `task_dirs`) before any model loads, and tasks that
execute model-written code only run with `allow_code_execution`. Each checkpoint's metrics are
saved with a fingerprint of everything that produced them, so a rerun skips what is already done.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from pathlib import Path

from trellis.core.errors import TrellisError
from trellis.core.hashing import content_hash
from trellis.core.recipe import local_path_problem
from trellis.evaluate.arguments import Checkpoint, EvalArguments
from trellis.train.arguments import ModelArguments

logger = logging.getLogger(__name__)


# lm-eval task YAML files shipped with Trellis; their relative data_files are resolved from the working
# directory, like every path in a recipe.
BUILTIN_TASKS = Path(__file__).parent / "tasks"


class EvaluationError(TrellisError):
    """A task, checkpoint or setting of the evaluation stage is unusable."""


# --- checks before anything heavy loads --------------------------------------------------------------


def task_dirs(args: EvalArguments) -> list[str]:
    """Trellis's own tasks (the tiny default's), then the recipe's."""
    return [str(BUILTIN_TASKS), *(os.path.abspath(os.path.expanduser(d)) for d in args.task_dirs)]


def task_manager(args: EvalArguments):
    """lm-eval's task index. Indexing lm-eval's own ~14,700 task names takes 7 s on a 2-core CPU, so when
    every task the recipe names is a single task of Trellis's or the recipe's task_dirs (the tiny default's
    are), only those directories are indexed."""
    from lm_eval.tasks import TaskManager

    own = TaskManager(include_path=task_dirs(args), include_defaults=False)
    if set(args.tasks) <= set(own.all_subtasks):  # not groups or tags: theirs may span lm-eval's tasks
        return own
    return TaskManager(include_path=task_dirs(args))


def check_tasks(args: EvalArguments, manager) -> None:
    """Every task name exists (else: the closest names), code-executing tasks are allowed, and the
    local data files of custom tasks exist."""
    available = manager.all_tasks
    problems = []
    for name in args.tasks:
        if name in available:
            continue
        close = difflib.get_close_matches(name, available, n=5, cutoff=0.5)
        close += [t for t in available if name.lower() in t.lower() and t not in close][: 5 - len(close)]
        hint = f"; closest: {', '.join(close)}" if close else ""
        problems.append(f"unknown task {name!r}{hint}")
    for name in args.tasks:
        config = _task_config(manager, name)
        if config.get("unsafe_code") and not args.allow_code_execution:
            problems.append(
                f"task {name!r} executes code the model writes; run it only in a sandbox, with "
                "'allow_code_execution: true'"
            )
        data_files = (config.get("dataset_kwargs") or {}).get("data_files")
        files = data_files.values() if isinstance(data_files, dict) else [data_files] if data_files else []
        for file in files:
            for path in [file] if isinstance(file, str) else file:
                if message := local_path_problem(path, f"data file of task {name!r}"):
                    problems.append(message)
    if problems:
        listing = f"lm_eval ls tasks --include_path {','.join(task_dirs(args))}"
        raise EvaluationError("\n  ".join(["tasks:", *problems, f"(all task names: `{listing}`)"]))


def _task_config(manager, name: str) -> dict:
    """The YAML config of a single task as lm-eval indexed it ({} for groups and Python tasks)."""
    entry = manager.task_index.get(name)
    return dict(getattr(entry, "cfg", None) or {})


def check_checkpoints(args: EvalArguments) -> None:
    """Local checkpoint paths exist (they are made by earlier stages, so this is checked at run time)."""
    problems = []
    for checkpoint in args.checkpoints:
        if checkpoint.path and (message := local_path_problem(checkpoint.path, "model directory")):
            problems.append(f"checkpoint {checkpoint.name!r}: {message}")
        if args.backend == "vllm" and checkpoint.model_config:
            problems.append(
                f"checkpoint {checkpoint.name!r}: the vllm backend needs a 'path', not 'model_config'"
            )
    if args.backend == "vllm" and args.perplexity:
        problems.append(
            "perplexity sets need the hf backend (set backend: hf, or move them to a separate run)"
        )
    if problems:
        raise EvaluationError("\n  ".join(["checkpoints:", *problems]))


# --- resuming: a fingerprint of what produced a checkpoint's metrics ---------------------------------


def fingerprint(args: EvalArguments, checkpoint: Checkpoint) -> str:
    """Changes when the checkpoint's weights, the tasks or any evaluation setting change."""
    import dataclasses

    settings = {
        key: value
        for key, value in dataclasses.asdict(args).items()
        if key
        not in (
            "output_dir",
            "checkpoints",
            "baseline",
            "candidate",
            "select_from",
            "select_by",
            "gates",
            "model_card",
        )
    }
    state = {"checkpoint": dataclasses.asdict(checkpoint), "settings": settings, "files": {}}
    files = []
    if checkpoint.path and os.path.isdir(checkpoint.path):
        # The model card is left out: this stage writes the results into it.
        files += [f for f in Path(checkpoint.path).iterdir() if f.is_file() and f.name != "README.md"]
    for directory in task_dirs(args):
        files += [f for f in Path(directory).rglob("*") if f.suffix in (".yaml", ".yml", ".py", ".jinja")]
    for file in sorted(files):
        stat = file.stat()
        state["files"][str(file)] = [stat.st_size, stat.st_mtime_ns]
    return content_hash(state)


def cached_metrics(output_dir: str, checkpoint: Checkpoint, key: str) -> dict | None:
    path = Path(output_dir) / "checkpoints" / f"{checkpoint.name}.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    return saved if saved.get("fingerprint") == key else None


def save_metrics(output_dir: str, checkpoint: Checkpoint, key: str, result: dict) -> None:
    path = Path(output_dir) / "checkpoints" / f"{checkpoint.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"fingerprint": key, **result}, indent=2, default=str) + "\n")


# --- running -----------------------------------------------------------------------------------------


def _lm_eval_model(args: EvalArguments, checkpoint: Checkpoint):
    """An lm-eval model. A path is handed to lm-eval as a string, so that under `accelerate launch`
    with several processes it shards the examples over them (data parallelism)."""
    from lm_eval.api.registry import get_model

    from trellis.data import chat
    from trellis.train import models

    if checkpoint.path:
        import torch

        kwargs = {
            "pretrained": checkpoint.path,
            "revision": checkpoint.revision or "main",
            "dtype": args.dtype,
            "batch_size": args.batch_size,
            "trust_remote_code": args.trust_remote_code,
            **({"tokenizer": checkpoint.tokenizer_name_or_path} if checkpoint.tokenizer_name_or_path else {}),
            **args.model_args,
        }
        if args.backend == "hf":  # lm-eval's default device is cuda, even without one
            kwargs.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
        lm = get_model(args.backend)(**kwargs)
    else:
        import torch
        from lm_eval.models.huggingface import HFLM
        from transformers import set_seed

        model_args = ModelArguments(
            model_config=checkpoint.model_config,
            tokenizer_name_or_path=checkpoint.tokenizer_name_or_path,
            dtype=None if args.dtype == "auto" else args.dtype,
        )
        tokenizer = models.load_tokenizer(model_args, args.trust_remote_code)
        set_seed(args.seed)
        model = models.load_model(model_args, tokenizer, trust_remote_code=args.trust_remote_code)
        if torch.cuda.is_available():
            model.to("cuda")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, **args.model_args)
    model, tokenizer = getattr(lm, "model", None), getattr(lm, "tokenizer", None)
    # A chat template the recipe asks for, or ChatML for a tokenizer that has none when tasks are chat-formatted.
    if tokenizer is not None and (
        checkpoint.chat_template or (args.apply_chat_template and not tokenizer.chat_template)
    ):
        chat.apply_chat_template(model, tokenizer, checkpoint.chat_template)
    return lm


def flatten_lm_eval_results(results: dict) -> tuple[dict[str, float], dict[str, bool]]:
    """lm-eval's {task: {"metric,filter": value}} as {"task.metric": value} (",filter" kept unless "none")."""
    metrics, higher_is_better = {}, {}
    for task, values in results["results"].items():
        for key, value in values.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            name = f"{task}.{metric}" if filter_name == "none" else f"{task}.{key}"
            metrics[name] = float(value)
            higher = results.get("higher_is_better", {}).get(task, {}).get(metric)
            if higher is not None:
                higher_is_better[name] = bool(higher)
    return metrics, higher_is_better


def evaluate_checkpoint(args: EvalArguments, checkpoint: Checkpoint, manager) -> dict | None:
    """Run the tasks and perplexity sets on one checkpoint. Returns its metrics on the main process
    (None on the others), with samples of every task written under output_dir/samples/<name>/."""
    from lm_eval import simple_evaluate

    from trellis.evaluate.perplexity import perplexity_metrics

    logger.info(
        "Evaluating checkpoint %r (%s)", checkpoint.name, checkpoint.path or "built from model_config"
    )
    lm = _lm_eval_model(args, checkpoint)
    metrics, higher_is_better, samples = {}, {}, {}
    if args.tasks:
        limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
        try:
            results = simple_evaluate(
                model=lm,
                tasks=list(args.tasks),
                num_fewshot=args.num_fewshot,
                limit=limit,
                apply_chat_template=args.apply_chat_template,
                fewshot_as_multiturn=args.fewshot_as_multiturn and args.apply_chat_template,
                system_instruction=args.system_instruction,
                gen_kwargs=args.gen_kwargs,
                task_manager=manager,
                confirm_run_unsafe_code=args.allow_code_execution,
                random_seed=args.seed,
                numpy_random_seed=args.seed,
                torch_random_seed=args.seed,
                fewshot_random_seed=args.seed,
            )
        except ConnectionError as error:  # a Hub dataset while offline
            raise EvaluationError(
                f"checkpoint {checkpoint.name!r}: a task's dataset could not be fetched: {error}"
            ) from None
        if results is not None:  # only the main process gets results
            metrics, higher_is_better = flatten_lm_eval_results(results)
            samples = results.get("samples", {})
    if getattr(lm, "rank", 0) == 0:
        for item in args.perplexity:
            values = perplexity_metrics(lm.model, lm.tokenizer, item, args.batch_size)
            metrics.update(values)
            higher_is_better.update(dict.fromkeys(values, False))
    if getattr(lm, "accelerator", None) is not None:
        lm.accelerator.wait_for_everyone()
    if getattr(lm, "rank", 0) != 0:
        return None
    _write_samples(Path(args.output_dir) / "samples" / checkpoint.name, samples)
    return {"metrics": metrics, "higher_is_better": higher_is_better}


def _write_samples(directory: Path, samples: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for task, rows in samples.items():
        with (directory / f"{task}.jsonl").open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, default=str) + "\n")
