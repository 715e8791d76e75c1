"""The repository's ``kernels/`` folder is ``fastnabla.kernels`` only: a process started from the repository root
(where the root is on sys.path) still gets Hugging Face's ``kernels`` package, or none, for ``import kernels``;
and importing fastnabla with its optional dependencies prints nothing."""
import importlib.metadata
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, cwd: str, pythonpath: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=pythonpath)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_import_kernels_from_the_repo_root_finds_the_installed_package(tmp_path):
    """A regular ``kernels`` package later on sys.path (an installed Hugging Face ``kernels``) wins over the root's
    folder, although the root ('' for ``python -c``) comes first."""
    site = tmp_path / "site" / "kernels"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("def get_kernel(*args, **kwargs):\n    return 'hub kernel'\n")
    p = _python("import kernels\nfrom kernels import get_kernel\nprint(kernels.__file__, get_kernel('x'))",
                cwd=ROOT, pythonpath=str(tmp_path / "site"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == [str(site / "__init__.py"), "hub", "kernel"]


def test_import_kernels_from_the_repo_root_gives_nothing_of_ours():
    """Without another ``kernels``: no module of ours under that name, ``get_kernel`` is an ImportError (what
    bitsandbytes catches), and transformers reports the package as absent; ``fastnabla.kernels`` is this
    checkout's folder."""
    code = (
        "import importlib\n"
        "try:\n"
        "    import kernels\n"
        "except ImportError:\n"
        "    print('file None')\n"
        "else:\n"
        "    print('file', getattr(kernels, '__file__', None))\n"
        "try:\n"
        "    from kernels import get_kernel\n"
        "except ImportError:\n"
        "    print('get_kernel ImportError')\n"
        "from transformers.utils import is_kernels_available\n"
        "print('available', is_kernels_available())\n"
        "import fastnabla.kernels.residual_db as k\n"
        "print('fastnabla.kernels', k.__file__)\n"
    )
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pass
    else:
        pytest.skip("Hugging Face's kernels is installed; the test above covers that case")
    p = _python(code, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.splitlines() == ["file None", "get_kernel ImportError", "available False",
                                     f"fastnabla.kernels {os.path.join(ROOT, 'kernels', 'residual_db.py')}"]


def test_fastnabla_kernels_from_an_installed_copy_is_the_copied_folder(tmp_path):
    """An installed fastnabla (setup.py copies kernels/ into the package) uses that copy, not a checkout's."""
    import shutil

    pkg = tmp_path / "site" / "fastnabla"
    shutil.copytree(os.path.join(ROOT, "fastnabla"), pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(os.path.join(ROOT, "kernels"), pkg / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    p = _python("import fastnabla.kernels.residual_db as k\nprint(k.__file__)", cwd=str(tmp_path),
                pythonpath=str(tmp_path / "site"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == str(pkg / "kernels" / "residual_db.py")


def test_importing_fastnabla_and_its_dependencies_prints_nothing():
    """bitsandbytes (through peft too) and DeepSpeed log on import; fastnabla drops exactly those lines."""
    deps = [d for d in ("bitsandbytes", "deepspeed", "peft", "diffusers", "transformers")
            if importlib.util.find_spec(d) is not None]
    if "bitsandbytes" not in deps and "deepspeed" not in deps:
        pytest.skip("neither bitsandbytes nor deepspeed is installed")
    p = _python("import fastnabla\n" + "".join(f"import {d}\n" for d in deps), cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout + p.stderr == ""


def test_only_the_known_import_lines_are_dropped():
    """The filters match one message each: other warnings of the same loggers still show."""
    import logging

    import fastnabla  # noqa: F401  (installs the filters)

    for name, kept, dropped in [
        ("bitsandbytes.backends.cpu.ops", "something else went wrong",
         "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ..."),
        ("DeepSpeed", "a real DeepSpeed warning", "Setting accelerator to CPU. If you have GPU ..."),
    ]:
        logger = logging.getLogger(name)
        record = lambda msg: logger.makeRecord(name, logging.WARNING, __file__, 1, msg, ("x",), None)  # noqa: E731
        assert logger.filter(record(kept)) and not logger.filter(record(dropped))


def test_a_normal_run_prints_no_dependency_warnings(tmp_path):
    """toy2d with the 8-bit optimizer (imports bitsandbytes) from the repository root: fastnabla's own lines only."""
    pytest.importorskip("bitsandbytes")
    cmd = [sys.executable, "-m", "fastnabla.train", "--config", "configs/toy2d.yaml", "--output-dir", str(tmp_path),
           "train.epochs=1", "train.optimizer=adamw8bit", "sampling.batch_size=32", "sampling.num_steps=10",
           "eval.num_samples=256", "logging.progress=false", "logging.plots=false", "model.hidden=32"]
    p = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=""),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = (p.stdout + p.stderr).splitlines()
    foreign = [line for line in lines if not (line.startswith(("done:", "outputs in")) or " fastnabla " in line)]
    assert foreign == [], foreign
