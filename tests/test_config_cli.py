"""Config validation and the CLI's user-error contract: one line naming file and key, exit 2, nothing run."""
import subprocess
import sys
import textwrap

import pytest

from study import cli
from study.trial.config import ConfigError, TrialConfig, load_trial, trial_from_dict

GOOD = textwrap.dedent("""\
    name: t
    data: {name: digits}
    prune: {method: hydra, keep_fraction: 0.1, score_init: ssi}
""")


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_good_config_loads_with_defaults_and_overrides(tmp_path):
    cfg = load_trial(write(tmp_path, GOOD), {"prune.keep_fraction": 0.05, "attack.steps": "7"})
    assert isinstance(cfg, TrialConfig)
    assert cfg.prune.keep_fraction == 0.05 and cfg.attack.steps == 7
    assert cfg.flat()["prune.keep_fraction"] == 0.05
    assert cfg.eval_eps == cfg.attack.eps


def test_the_shipped_trial_config_loads():
    cfg = load_trial("configs/trial_digits.yaml")
    assert cfg.data.name == "digits" and cfg.prune.method == "hydra"


@pytest.mark.parametrize("text,key,needle", [
    ("prune: {keep_fration: 0.1}", "prune.keep_fration", "valid keys: method, keep_fraction"),
    ("prune: {keep_fraction: 1.5}", "prune.keep_fraction", "out of range"),
    ("prune: {keep_fraction: 0}", "prune.keep_fraction", "must be > 0"),
    ("prune: {score_init: magic}", "prune.score_init", "valid choices: kaiming_normal"),
    ("prune: {scope: everywhere}", "prune.scope", "valid choices: layer, global"),
    ("data: {name: imagenet}", "data.name", "valid choices: digits"),
    ("model: {arch: gpt}", "model.arch", "valid choices: small_cnn"),
    ("attack: {schedule: wiggly}", "attack.schedule", "valid choices: constant"),
    ("attack: {loss: hinge}", "attack.loss", "valid choices: pgd"),
    ("attack: {steps: many}", "attack.steps", "expected an integer"),
    ("finetune: 3", "finetune", "expected a section"),
    ("colour: red", "colour", "unknown key"),
])
def test_bad_values_name_the_key_and_the_choices(tmp_path, text, key, needle):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_trial(path)
    assert err.value.key == key
    assert needle in str(err.value)
    assert str(path) in str(err.value)


def test_override_of_a_missing_key_is_rejected():
    with pytest.raises(ConfigError, match="prune.sparsity"):
        trial_from_dict({}, {"prune.sparsity": 0.9})


@pytest.mark.parametrize("text,args,needle", [
    ("prune: {keep_fraction: 2}", [], "prune.keep_fraction"),
    ("prune: [unclosed", [], "not valid YAML"),
    (GOOD, ["--set", "prune.score_init=nope"], "valid choices"),
    (GOOD, ["--set", "nonsense"], "key=value"),
    ("data: {name: cifar10, root: /nonexistent/data}", [], "cifar10"),
])
def test_cli_user_errors_exit_2_with_one_line(tmp_path, capsys, text, args, needle):
    path = write(tmp_path, text)
    code = cli.main(["trial", str(path), *args, "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing started


def test_cli_missing_file_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "study.cli", "trial", str(tmp_path / "nope.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "nope.yaml" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


STUCK_COMMAND = textwrap.dedent("""
    import sys, threading, time
    from study import cli

    def stuck_in_a_thread():
        time.sleep(60)

    def cmd_report(args):  # a command that does not get on: its main thread and a helper thread wait
        threading.Thread(target=stuck_in_a_thread, name="helper", daemon=True).start()
        print("waiting", flush=True)
        time.sleep(60)
        return 0

    cli.cmd_report = cmd_report
    sys.exit(cli.main(["report", "anything"]))
""")


def test_sigusr1_prints_every_threads_stack_and_the_command_goes_on():
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-c", STUCK_COMMAND], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "waiting"
        time.sleep(0.5)
        proc.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        assert proc.poll() is None  # the dump does not end the command
    finally:
        proc.kill()
    err = proc.communicate()[1]
    assert "stuck_in_a_thread" in err and "cmd_report" in err, err  # both threads, by function
