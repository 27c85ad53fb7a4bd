"""vLLM is optional: `import csq_ext` never imports it (with or without vLLM installed), and
`import csq_ext.vllm` without it raises an ImportError that says what to install. Runs in
every environment (fresh interpreters, so nothing imported before can hide an import)."""
import subprocess
import sys

NO_VLLM = "import sys; sys.modules['vllm'] = None\n"  # as if vLLM were not installed


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)


def test_import_csq_ext_does_not_import_vllm():
    r = _run("import sys, csq_ext, csq_ext.pool\n"
             "assert not [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')], "
             "sorted(m for m in sys.modules if m.startswith('vllm'))")
    assert r.returncode == 0, r.stderr


def test_csq_ext_vllm_without_vllm_says_what_to_install():
    r = _run(NO_VLLM + "import csq_ext\n"
             "try:\n    import csq_ext.vllm\nexcept ImportError as e:\n    print(e)\n"
             "else:\n    raise SystemExit('no ImportError')")
    assert r.returncode == 0, r.stderr
    assert "pip install 'csq_ext[vllm]'" in r.stdout and "vllm==0.32.0" in r.stdout, r.stdout
