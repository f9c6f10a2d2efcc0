"""Every command on bad input: exit 2, one `error:` line naming the flag / file / field, no traceback,
and no file left behind (issue 15).

The CLI runs in-process. Each input fails before a model would load: the model is a path that does not
exist, so an input checked too late shows up as a "could not be resolved" message instead of the expected
one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from decodetune.cli.main import main

NO_MODEL = "./no-such-model"


def _write_inputs(root: Path) -> None:
    """The bad (and good) files the cases refer to as {name}."""
    (root / "adir").mkdir()
    (root / "afile.txt").write_text("not a folder\n")
    (root / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    (root / "malformed.jsonl").write_text('{"prompt": "ok"}\n{"prompt": broken}\n')
    (root / "latin1.jsonl").write_bytes('{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    (root / "noprompt.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    (root / "badmsgs.jsonl").write_text('{"messages": "hello"}\n')
    (root / "array.jsonl").write_text('[1, 2]\n')
    (root / "blank.jsonl").write_text("\n\n")
    (root / "fake.gguf").write_text("this is not a GGUF file\n")
    (root / "badcfg.json").write_text(json.dumps({"temperature": 0.5, "nucleus": 0.9}))
    (root / "brokencfg.yaml").write_text("temperature: [0.5\n")
    (root / "lowhigh.yaml").write_text("strategy: sample\ntop_p: {low: 0.9, high: 0.1}\n")
    (root / "unknownparam.yaml").write_text("strategy: sample\nnucleus: {low: 0.1, high: 0.9}\n")
    (root / "logzero.yaml").write_text("strategy: sample\ntemperature: {low: 0, high: 1, log: true}\n")
    (root / "dup.jsonl").write_text('{"id": "a", "prompt": "x", "answer": "1"}\n'
                                    '{"id": "a", "prompt": "y", "answer": "2"}\n')
    (root / "taskbad.jsonl").write_text('{"prompt": "x", "answer": "1"}\n{"answer": "2"}\n')
    (root / "task.txt").write_text("prompt,answer\n")
    (root / "student.yaml").write_text("layers: [0, 1]\nnope: 3\n")
    (root / "badanswer.jsonl").write_text('{"prompt": "x", "answer": {"a": 1}}\n')


# (argv, text the one error line must contain); {x} is a file of _write_inputs, {tmp} the folder
CASES: list[tuple[list[str], str]] = [
    # ---- usage errors: one line, not typer's box
    (["generate", "--temperature", "abc"], "--temperature: 'abc' is not a number"),
    (["generate", "--top-k", "1.5"], "--top-k: '1.5' is not an integer"),
    (["generate", "--bogus"], "--bogus: no such option"),
    (["generate", "--promt", "x"], "--promt: no such option (did you mean --prompt"),
    (["generate", "--prompt"], "--prompt: needs a value"),
    (["generate", "--prompt", "hi", "extra"], "unexpected extra argument"),
    (["nosuchcommand"], "no such command 'nosuchcommand'"),
    (["eval"], "--task: missing"),
    (["tune", "--task", "arith", "--trials", "many"], "--trials: 'many' is not an integer"),
    (["tune", "--task", "arith", "--no-pruning"], "--no-pruning: no such option"),
    (["tasks", "--examples", "x"], "--examples: 'x' is not an integer"),
    (["models", "--download"], "--download: needs a value"),
    (["status"], "--storage: missing"),
    (["compare", "--task", "arith", "--alpha", "low"], "--alpha: 'low' is not a number"),
    # ---- generate
    (["generate", "--prompt", "hi", "--input", "{prompts.jsonl}"], "give --prompt or --input, not both"),
    (["generate", "--prompt", "hi", "--output", "{adir}"], "--output {adir}: is a directory"),
    (["generate", "--prompt", "hi", "--output", "{afile.txt}/out.jsonl"], "{afile.txt} is a file"),
    (["generate", "--input", "{tmp}/missing.jsonl"], "missing.jsonl: file not found"),
    (["generate", "--input", "{adir}"], "{adir}: is a directory"),
    (["generate", "--input", "{malformed.jsonl}"], "malformed.jsonl:2: malformed JSON"),
    (["generate", "--input", "{latin1.jsonl}"], "latin1.jsonl:2: not valid UTF-8"),
    (["generate", "--input", "{noprompt.jsonl}"], "noprompt.jsonl:2: missing or empty 'prompt'"),
    (["generate", "--input", "{badmsgs.jsonl}"], "badmsgs.jsonl:1: 'messages' must be"),
    (["generate", "--input", "{array.jsonl}"], "array.jsonl:1: expected a JSON object"),
    (["generate", "--input", "{blank.jsonl}"], "empty prompt list"),
    (["generate", "--prompt", ""], "--prompt #1: empty prompt"),
    (["generate"], "empty prompt list"),
    (["generate", "--prompt", "hi", "--temperature", "-1"], "temperature: must be >= 0"),
    (["generate", "--prompt", "hi", "--top-p", "1.5"], "top_p: must be in (0, 1]"),
    (["generate", "--prompt", "hi", "--strategy", "beamy"], "strategy"),
    (["generate", "--prompt", "hi", "--strategy", "beam", "--num-beams", "0"], "num_beams: must be >= 1"),
    (["generate", "--prompt", "hi", "--config", "{tmp}/nope.json"], "nope.json: file not found"),
    (["generate", "--prompt", "hi", "--config", "{badcfg.json}"], "nucleus: unknown config key"),
    (["generate", "--prompt", "hi", "--config", '{"top_k": -1}'], "top_k: must be >= 0"),
    (["generate", "--prompt", "hi", "--config", "{bad"], "malformed inline JSON"),
    (["generate", "--prompt", "hi", "--config", '{"nucleus": 0.9}'], "nucleus: unknown config key in --config"),
    (["eval", "--task", "arith", "--config", "[1]"], "inline JSON must be an object"),
    (["generate", "--prompt", "hi", "--batch-size", "0"], "--batch-size: must be >= 1"),
    (["generate", "--prompt", "hi", "--logit-bias", "abc"], "--logit-bias: 'abc' is not TOKEN=BIAS"),
    (["generate", "--prompt", "hi", "--logit-bias", "5=1", "--logit-bias", "5-2"], "--logit-bias: token 5 given twice"),
    (["generate", "--prompt", "hi", "--logit-bias", "5=500"], "logit_bias: token 5: bias must be a number in [-100"),
    (["generate", "--prompt", "hi", "--stop-token-ids", "x"], "--stop-token-ids: 'x' is not an integer"),
    (["generate", "--prompt", "hi", "--mirostat", "3"], "mirostat: must be 0 (off), 1 or 2"),
    (["generate", "--prompt", "hi", "--dry-multiplier", "-1"], "dry_multiplier: must be >= 0"),
    (["generate", "--prompt", "hi", "--xtc-probability", "2"], "xtc_probability: must be in [0, 1]"),
    (["generate", "--prompt", "hi", "--dtype", "fp16"], "--dtype: must be one of fp32, bf16, int8, got 'fp16'"),
    (["eval", "--task", "arith", "--backend", "llamacpp", "--dtype", "bf16"], "--dtype: the llamacpp backend"),
    (["tune", "--task", "arith", "--out", "{tmp}/o", "--backend", "vllm", "--dtype", "int8"],
     "--dtype: the vllm backend takes fp32 or bf16"),
    (["generate", "--prompt", "hi", "--model", "{fake.gguf}"], "fake.gguf': not a loadable GGUF file"),
    # ---- tasks / models
    (["tasks", "nosuchtask"], "nosuchtask"),
    (["tasks", "{dup.jsonl}"], "dup.jsonl:2: duplicate id 'a'"),
    (["models", "--download", "gpt-17"], "--download: unknown builtin model 'gpt-17'"),
    # ---- eval
    (["eval", "--task", "nosuchtask"], "nosuchtask"),
    (["eval", "--task", "{task.txt}"], "unknown task file type '.txt'"),
    (["eval", "--task", "{taskbad.jsonl}"], "taskbad.jsonl:2: missing field 'prompt'"),
    (["eval", "--task", "{badanswer.jsonl}"], "badanswer.jsonl:1: field 'answer'"),
    (["eval", "--task", "arith", "--repeats", "0"], "--repeats: must be >= 1"),
    (["eval", "--task", "arith", "--limit", "0"], "--limit: must be >= 1"),
    (["eval", "--task", "arith", "--bootstrap", "-1"], "--bootstrap: must be >= 0"),
    (["eval", "--task", "arith", "--output", "{adir}"], "--output {adir}: is a directory"),
    (["eval", "--task", "arith", "--cache", "{adir}"], "--cache {adir}: is a directory"),
    (["eval", "--task", "arith", "--top-p", "3"], "top_p"),
    (["eval", "--task", "arith", "--config", '{"top_p": 3}'], "top_p"),
    (["eval", "--task", "arith", "--augment", "shout"], "shout"),
    # ---- compare
    (["compare", "--task", "arith", "-c", "{}"], "at least two configs"),
    (["compare", "--task", "arith", "-c", "{}", "-c", "{}", "--alpha", "2"], "--alpha: must be in (0, 1)"),
    (["compare", "--task", "arith", "-c", "{bad", "-c", "{}"], "malformed inline JSON"),
    (["compare", "--task", "arith", "-c", "{tmp}/nope.json", "-c", "{}"], "nope.json: file not found"),
    (["compare", "--task", "arith", "-c", "{}", "-c", '{"top_k": -1}'], "top_k"),
    (["compare", "--task", "arith", "-c", "{}", "-c", "{}", "--output", "{adir}"], "--output {adir}"),
    (["compare", "--task", "arith", "-c", "{}", "-c", "{}", "--limit", "0"], "--limit: must be >= 1"),
    # ---- tune
    (["tune", "--task", "arith", "--out", "{afile.txt}"], "--out {afile.txt}: is a file, expected a folder"),
    (["tune", "--task", "arith", "--out", "{tmp}/o", "--storage", "foo://bar"], "storage: cannot open 'foo://bar'"),
    (["tune", "--task", "arith", "--out", "{tmp}/o", "--storage", "postgresql://u:pw@127.0.0.1:9/x"],
     "storage: cannot open 'postgresql://u:***@127.0.0.1:9/x'"),
    (["tune", "--task", "arith", "--out", "{tmp}/o", "--storage", "study.txt"], "is neither an Optuna storage URL"),
    (["tune", "--task", "arith", "--out", "{tmp}/o", "--search", "annealing"], "--search: unknown search"),
    (["tune", "--task", "arith", "--out", "{tmp}/o", "--trials", "0"], "--trials: must be >= 1"),
    (["tune", "--task", "arith", "--out", "{tmp}/o", "--batch-trials", "0"], "--batch-trials: must be >= 1"),
    (["tune", "--task", "arith", "--out", "{tmp}/o", "--timeout", "0"], "--timeout: must be > 0"),
    (["tune", "--task", "arith", "--out", "{tmp}/o", "--budget-tokens", "0"], "--budget-tokens: must be >= 1"),
    (["tune", "--task", "arith", "--out", "{tmp}/o", "--space", "{tmp}/none.yaml"], "none.yaml: file not found"),
    (["tune", "--task", "arith", "--out", "{tmp}/o", "--space", "{lowhigh.yaml}"], "lowhigh.yaml:2: top_p: low"),
    (["tune", "--task", "arith", "--out", "{tmp}/o", "--space", "{unknownparam.yaml}"],
     "unknownparam.yaml:2: unknown parameter 'nucleus'"),
    (["tune", "--task", "arith", "--out", "{tmp}/o", "--space", "{logzero.yaml}"], "logzero.yaml:2: temperature"),
    (["tune", "--task", "arith", "--out", "{tmp}/o", "--objective", "bleuu"], "--objective bleuu: unknown metric"),
    (["tune", "--task", "story", "--out", "{tmp}/o", "--objective", "chrf"], "chrf needs references"),
    (["tune", "--task", "arith", "--out", "{tmp}/o", "--repeats", "0"], "--repeats: must be >= 1"),
    # ---- report / status
    (["report", "--storage", "sqlite:///{tmp}/missing.db", "--out", "{tmp}/r.html"], "missing.db does not exist"),
    (["report", "--storage", "{tmp}/none.journal", "--out", "{tmp}/r.html"], "none.journal does not exist"),
    (["report", "--storage", "{study.journal}", "--out", "{adir}"], "--output {adir}: is a directory"),
    (["report", "--storage", "{study.journal}", "--study-name", "nope", "--out", "{tmp}/r.html"],
     "no study 'nope' in the storage; it has s1"),
    (["status", "--storage", "sqlite:///{tmp}/missing2.db"], "missing2.db does not exist"),
    (["status", "--storage", "{tmp}/none.journal"], "none.journal does not exist"),
    (["status", "--storage", "{study.journal}", "--study-name", "nope"], "no study 'nope'"),
    # ---- demo / worker
    (["demo", "--out", "{afile.txt}"], "--out {afile.txt}: is a file"),
    (["demo", "--out", "{tmp}/d", "--trials", "0"], "--trials: must be >= 1"),
    (["demo", "--out", "{tmp}/d", "--threads", "-1"], "--threads: must be >= 0"),
    (["demo", "--out", "{tmp}/d", "--space", "{lowhigh.yaml}"], "lowhigh.yaml:2: top_p: low"),
    (["worker", "--storage", "sqlite:///{tmp}/w.db", "--study-name", "s", "--task", "arith"], "not safe for parallel"),
    (["worker", "--storage", "{tmp}/w.journal", "--study-name", "s", "--task", "arith", "--n-trials", "0"],
     "--n-trials: must be >= 1"),
    (["worker", "--storage", "{tmp}/w.journal", "--task", "arith"], "--study-name: missing"),
    # ---- distill / distill-eval / augment
    (["distill", "--student", "{tmp}/none.yaml", "--data", "{prompts.jsonl}", "--out", "{tmp}/s"], "none.yaml"),
    (["distill-eval", "--student", NO_MODEL, "--data", "{prompts.jsonl}", "--output", "{adir}"],
     "--output {adir}: is a directory"),
    (["distill-eval", "--student", NO_MODEL, "--data", "{prompts.jsonl}", "--batch-size", "0"], "--batch-size"),
    (["augment", "--input", "{prompts.jsonl}", "--out", "{adir}", "--ops", "swap"], "--output {adir}: is a directory"),
    (["augment", "--input", "{prompts.jsonl}", "--out", "{tmp}/a.jsonl", "--ops", "shout"], "shout"),
    (["augment", "--input", "{prompts.jsonl}", "--out", "{tmp}/a.jsonl", "--ops", "swap", "--n", "0"],
     "--n: must be >= 1"),
    (["augment", "--input", "{tmp}/none.jsonl", "--out", "{tmp}/a.jsonl", "--ops", "swap"],
     "none.jsonl: file not found"),
]

#: commands that load a model get a path that does not exist (see the module docstring)
_MODEL_FLAG = {"generate": "--model", "eval": "--model", "compare": "--model", "tune": "--model",
               "demo": "--model", "worker": "--model", "distill": "--teacher", "distill-eval": "--teacher",
               "augment": "--model"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    _write_inputs(root)
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.create_study(storage=JournalStorage(JournalFileBackend(str(root / "study.journal"))), study_name="s1")
    return root


def _expand(arg: str, root: Path) -> str:
    out = arg.replace("{tmp}", str(root))
    for p in root.iterdir():
        out = out.replace("{" + p.name + "}", str(p))
    return out


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _id(case: tuple[list[str], str]) -> str:
    return " ".join(case[0])[:60]


@pytest.mark.parametrize("argv, message", CASES, ids=[_id(c) for c in CASES])
def test_bad_input_is_one_error_line(argv, message, inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # default outputs (decodetune-out/, report.html) would land here
    args = [_expand(a, inputs) for a in argv]
    flag = _MODEL_FLAG.get(args[0])
    if flag and flag not in args:
        args[1:1] = [flag, NO_MODEL]
    before = _tree(inputs)
    code = main(args)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert "Traceback" not in captured.err + captured.out
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert _expand(message, inputs) in lines[0]
    assert "could not be resolved" not in lines[0]  # the input was checked before the model
    assert _tree(inputs) == before, "files left behind"
    assert _tree(tmp_path) == set(), "files left behind"


def test_at_least_sixty_cases_cover_every_command():
    assert len(CASES) >= 60
    assert {argv[0] for argv, _ in CASES} >= {"generate", "models", "tasks", "eval", "compare", "tune", "report",
                                              "demo", "status", "worker", "distill", "distill-eval", "augment"}


def _commands() -> list[str]:
    from decodetune.cli.main import app

    return [c.name for c in app.registered_commands if c.name]


@pytest.mark.parametrize("command", _commands())
def test_every_command_gives_usage_errors_in_one_line(command, tmp_path, monkeypatch, capsys):
    """Also commands added later: an unknown option and a bad value are one line, exit 2."""
    monkeypatch.chdir(tmp_path)
    assert main([command, "--no-such-option"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --no-such-option: no such option\n" or (
        err.startswith("error: --no-such-option: no such option (did you mean") and err.count("\n") == 1), err
    assert _tree(tmp_path) == set()


def test_help_is_still_typers(capsys):
    assert main(["generate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--temperature" in out and "Usage" in out
    assert "<bool>" not in out  # switches take no value; the help must not suggest one


def test_storage_folders_one_rule_create_and_a_bad_url_leaves_none(tmp_path):
    from decodetune.errors import UserError
    from decodetune.tuning.study import resolve_storage

    info = resolve_storage(f"sqlite:///{tmp_path}/new/sub/s.db", tmp_path / "out")
    assert (tmp_path / "new" / "sub" / "s.db").is_file() and info.cache_path.parent == tmp_path / "new" / "sub"
    resolve_storage(str(tmp_path / "j" / "deep" / "s.journal"), tmp_path / "out")
    assert (tmp_path / "j" / "deep").is_dir()
    for bad in ("foo://bar", f"sqlite:///{tmp_path}/afile/x.db"):
        (tmp_path / "afile").write_text("x")
        with pytest.raises(UserError, match="storage|afile"):
            resolve_storage(bad, tmp_path / "o2" / "deep")
        assert not (tmp_path / "o2").exists()


def test_readme_examples_use_real_tasks_and_flags():
    import re
    import shlex

    import typer.main

    from decodetune.cli.demo_cmd import demo_command
    from decodetune.cli.main import app
    from decodetune.tasks import load_task

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    group = typer.main.get_command(app)
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    lines = [ln.split("  #")[0] for b in blocks for ln in b.splitlines() if ln.startswith("decodetune ")]
    assert len(lines) >= 10
    for line in lines:
        argv = shlex.split(line.replace("$URL", "postgresql://h/db"))[1:]
        command = group.commands[argv[0]]
        flags = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        for arg in argv[1:]:
            if arg.startswith("-"):
                assert arg in flags, (line, arg)
        for task in re.findall(r"--task (\S+)", line):
            load_task(task)  # a builtin name, not "arithmetic"
    out_default = [p.default for p in group.commands["demo"].params if p.name == "out"][0]
    assert f"writes `{Path(out_default) / 'report.html'}`" in readme and demo_command


def test_eval_and_compare_read_config_the_same_way():
    from decodetune.cli.compare_cmd import parse_config_arg
    from decodetune.cli.eval_cmd import explicit_config

    inline = '{"strategy": "sample", "top_k": 3}'
    assert explicit_config({"__file__": inline}) == parse_config_arg(inline)[1]
    # inline fields are checked with the flags: a beam config's width may come from --num-beams
    assert explicit_config({"__file__": '{"strategy": "beam"}', "num_beams": 3}) == {"strategy": "beam",
                                                                                   "num_beams": 3}


def test_output_is_spelled_out_and_output_everywhere():
    """``--out`` and ``--output`` are one idea: every command that writes takes both spellings."""
    import typer.main

    from decodetune.cli.main import app

    group = typer.main.get_command(app)
    writers = 0
    for name, command in group.commands.items():
        for param in command.params:
            if {"--out", "--output"} & set(param.opts):
                writers += 1
                assert {"--out", "--output"} <= set(param.opts), (name, param.opts)
    assert writers >= 10


@pytest.mark.parametrize("storage", [None, "sqlite:///{tmp}/db/s.db", "{tmp}/j/s.journal"])
def test_a_model_that_cannot_be_resolved_leaves_no_storage_behind(storage, tmp_path, monkeypatch, capsys):
    """The storage opens before the model (a bad URL fails fast); a bad model then removes what it created."""
    monkeypatch.chdir(tmp_path)
    args = ["tune", "--model", NO_MODEL, "--task", "arith", "--trials", "1", "--out", str(tmp_path / "out")]
    if storage is not None:
        args += ["--storage", storage.replace("{tmp}", str(tmp_path))]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model") and "could not be resolved" in err and "\n" not in err
    assert _tree(tmp_path) == set(), "files left behind"


def test_a_bad_model_leaves_an_existing_study_alone(tmp_path, monkeypatch, capsys):
    import optuna

    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path}/s.db"
    optuna.create_study(storage=url, study_name="kept")
    assert main(["tune", "--model", NO_MODEL, "--task", "arith", "--storage", url, "--out", str(tmp_path)]) == 2
    capsys.readouterr()
    assert [s.study_name for s in optuna.get_all_study_summaries(url, include_best_trial=False)] == ["kept"]
