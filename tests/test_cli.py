"""The ``pygan-optim`` command as a user meets it: help and exit codes, the quiet console
of ``train`` (MMEngine's dumps only in the log file), and one-line config errors.

The train runs are real subprocesses of the installed console script on the tiny
BigGAN config, shortened with --cfg-options.
"""
import glob
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pygan_optim import cli
from pygan_optim.console import DUMPS, NOISE

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "biggan_32x32_tiny.py")
_SCRIPT = Path(sys.executable).with_name("pygan-optim")
CMD = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "pygan_optim.cli"]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
SHORT = ["train_cfg.max_iters=2", "default_hooks.logger.interval=1",
         "default_hooks.checkpoint.interval=2"]
ENV_DUMP, CONFIG_DUMP, HOOK_DUMP = "System environment:", "Config:\n", \
    "Hooks will be executed in the following order"


def run(*args, timeout=240):
    env = dict(os.environ)
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # the CLI sets it itself
    p = subprocess.run(CMD + list(args), capture_output=True, text=True, timeout=timeout,
                       cwd=ROOT, env=env)
    return p.returncode, ANSI.sub("", p.stdout), ANSI.sub("", p.stderr)


def log_text(work_dir) -> str:
    logs = sorted(glob.glob(os.path.join(str(work_dir), "*", "*.log")))
    assert logs, f"no log file under {work_dir}"
    return Path(logs[-1]).read_text()


def error_lines(stderr):
    return [line for line in stderr.splitlines() if "error:" in line]


# --- help, version, usage errors ---------------------------------------------------

def test_help_is_on_stdout_with_exit_0():
    code, out, err = run("--help")
    assert code == 0, err
    assert "usage: pygan-optim" in out and "train" in out and "migrate" in out
    assert err == ""


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["migrate", "--help"],
                                  ["train", "-h"], ["--version"]])
def test_help_of_each_command_exits_0_on_stdout(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0
    out, err = capsys.readouterr()
    assert out.strip() and err == ""
    if argv[0] == "train":
        assert "--quiet" in out and "--verbose" in out and "--debug" in out
        assert "Exit codes" in out


@pytest.mark.parametrize("argv, says", [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["train"], "required: CONFIG, --work-dir"),
    (["train", TINY, "--work-dir", "x", "--quiet", "--verbose"], "not allowed with"),
    (["train", TINY, "--work-dir", "x", "--bogus"], "unrecognized arguments: --bogus"),
    (["migrate"], "give a 0.x config"),
])
def test_usage_errors_exit_2_on_stderr(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and says in err and "usage:" in err


def test_no_command_exits_2(capsys):
    assert cli.main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "no command given" in err and "usage:" in err


def test_missing_config_is_one_line_exit_1(tmp_path, capsys):
    assert cli.main(["train", str(tmp_path / "nope.py"), "--work-dir", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [f"pygan-optim train: error: config file not found: "
                                f"{tmp_path / 'nope.py'}"]


def test_syntax_error_in_config_is_one_line_exit_1(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text(f"_base_ = [{TINY!r}]\ntrain_cfg = dict(max_iters=2\n")
    assert cli.main(["train", str(bad), "--work-dir", str(tmp_path / "w")]) == 1
    out, err = capsys.readouterr()
    assert len(err.splitlines()) == 1, err
    assert "cannot read the config" in err and "SyntaxError" in err and "line 2" in err
    assert "Traceback" not in err


def test_a_ctrl_c_that_mmengine_turns_into_another_error_is_still_exit_130(
        tmp_path, capsys, monkeypatch):
    """Bug (session 39's CI, test_gaps_s33 at 2.0 s): a Ctrl-C landing in MMEngine's
    config formatting, whose bare except around yapf raises SyntaxError instead,
    was reported as "cannot start training ... SyntaxError", exit 1."""
    from mmengine.config import Config

    def interrupted_formatting(self):
        try:
            raise KeyboardInterrupt  # the Ctrl-C, landing inside yapf
        except:  # noqa: E722  (as MMEngine's pretty_text catches everything)
            raise SyntaxError("Failed to format the config file")

    monkeypatch.setattr(Config, "pretty_text", property(interrupted_formatting))
    assert cli.main(["train", TINY, "--work-dir", str(tmp_path / "w")]) == 130
    err = capsys.readouterr().err
    assert err.splitlines() == ["pygan-optim train: interrupted; no checkpoint was saved"], err


# --- a quiet training run -----------------------------------------------------------

@pytest.fixture(scope="module")
def quiet_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("quiet")
    return work, run("train", TINY, "--work-dir", str(work), "--quiet",
                     "--cfg-options", *SHORT)


def test_quiet_console_has_iterations_but_no_dumps(quiet_run):
    work, (code, out, err) = quiet_run
    assert code == 0, err[-3000:]
    assert "Iter(train) [1/2]" in out and "Iter(train) [2/2]" in out
    assert "Saving checkpoint at 2 iterations" in out
    for dump in (ENV_DUMP, CONFIG_DUMP, HOOK_DUMP, "custom_hooks = ["):
        assert dump not in out
    for noise in NOISE:
        assert noise not in out
    # One pointer to where the dumps went, then only a handful of lines.
    assert re.search(r"environment, config and hooks are in \S+\.log", out)
    assert len(out.splitlines()) <= 15, out
    assert err == ""  # no Python warnings either


def test_quiet_run_keeps_the_full_dump_in_the_log_file(quiet_run):
    work, (code, out, err) = quiet_run
    assert code == 0
    log = log_text(work)
    for dump in (ENV_DUMP, CONFIG_DUMP, HOOK_DUMP, "custom_hooks = ["):
        assert dump in log
    assert "Iter(train) [2/2]" in log
    # what the console drops is still written to the file
    assert '"FileClient" will be deprecated' in log
    assert len(log.splitlines()) > 150
    assert str(Path(glob.glob(os.path.join(str(work), "*", "*.log"))[0])) in out


def test_quiet_resume_prints_no_torch_load_warning(quiet_run):
    work, (code, _, _) = quiet_run
    assert code == 0
    code, out, err = run("train", TINY, "--work-dir", str(work), "--resume",
                         "--cfg-options", *SHORT[1:], "train_cfg.max_iters=3")
    assert code == 0, err[-3000:]
    assert "resumed epoch: 0, iter: 2" in out and "Iter(train) [3/3]" in out
    assert ENV_DUMP not in out and "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in err
    assert err == ""


def test_quiet_is_the_default_and_verbose_prints_the_dumps(tmp_path):
    # An unknown model type fails after the environment and config dumps were logged,
    # so no training is needed to see what each mode prints.
    opts = ["--cfg-options", "model.type=BigGAM"]
    code, out, err = run("train", TINY, "--work-dir", str(tmp_path / "q"), *opts)
    assert code == 1 and ENV_DUMP not in out and CONFIG_DUMP not in out
    code, out, err = run("train", TINY, "--work-dir", str(tmp_path / "v"), "--verbose", *opts)
    assert code == 1 and ENV_DUMP in out and CONFIG_DUMP in out
    assert len(error_lines(err)) == 1 and "unknown model type 'BigGAM'" in err
    assert "did you mean 'BigGAN'?" in err


# --- config errors ------------------------------------------------------------------

def test_typo_in_a_key_is_one_line_with_exit_1(tmp_path):
    code, out, err = run("train", TINY, "--work-dir", str(tmp_path),
                         "--cfg-options", "model.generator.base_channel=8")
    assert code == 1
    assert "Traceback" not in err and "Traceback" not in out
    assert ENV_DUMP not in out
    lines = err.splitlines()
    # a hint before the run, then the error: one line each
    assert lines[0] == ("pygan-optim train: warning: --cfg-options model.generator.base_channel "
                        "adds a new key; did you mean model.generator.base_channels?")
    (line,) = error_lines(err)
    assert line == lines[-1] and len(lines) == 2
    assert line.startswith("pygan-optim train: error: cannot start training from ")
    assert "unexpected keyword argument 'base_channel'" in line
    assert "--debug shows the traceback" in line
    assert "Traceback (most recent call last)" in log_text(tmp_path)


def test_unknown_type_names_the_closest_registered_one(tmp_path):
    code, out, err = run("train", TINY, "--work-dir", str(tmp_path),
                         "--cfg-options", "model.generator.type=BigGANGeneratr")
    assert code == 1 and "Traceback" not in err
    (line,) = err.splitlines()
    assert "unknown model type 'BigGANGeneratr'; did you mean 'BigGANGenerator'?" in line


def test_debug_shows_the_traceback_after_the_one_line(tmp_path):
    code, out, err = run("train", TINY, "--work-dir", str(tmp_path), "--debug",
                         "--cfg-options", "train_cfg.max_iter=2")
    assert code == 1
    lines = err.splitlines()
    first_error = next(i for i, line in enumerate(lines) if "error:" in line)
    tb = lines.index("Traceback (most recent call last):")
    assert first_error < tb
    assert "unexpected keyword argument 'max_iter'" in lines[first_error]
    assert lines[-1].startswith("TypeError: ") and "max_iter" in lines[-1]


def test_likely_typos_that_mmengine_accepts_get_a_warning(tmp_path):
    from mmengine.config import Config

    typo = tmp_path / "typo.py"
    typo.write_text(f"_base_ = [{TINY!r}]\ntrain_cfgs = dict(max_iters=2)\nimg_size = 32\n")
    cfg = Config.fromfile(str(typo))
    warnings = cli._check_keys(cfg, {"lod_from": "x.pth", "resume": True,
                                     "train_cfg.max_iters": 3,
                                     "model.generator.new_kwarg": 1})
    assert warnings == [
        "config key 'train_cfgs' is not read by MMEngine's Runner; did you mean 'train_cfg'?",
        "--cfg-options lod_from adds a new key; did you mean load_from?",
    ]
