"""The integrations are optional: `import smoothce` imports neither library, and an integration whose
library is missing says how to install it."""
import importlib
import subprocess
import sys

import pytest


def test_core_package_imports_no_integration_library():
    code = ("import sys, smoothce, smoothce.integrations; "
            "print(sorted(m for m in ('timm', 'transformers', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("library", ["timm", "transformers"])
def test_missing_library_says_how_to_install_it(library, monkeypatch):
    monkeypatch.setitem(sys.modules, library, None)  # makes `import <library>` raise ImportError
    monkeypatch.delitem(sys.modules, f"smoothce.integrations.{library}", raising=False)
    with pytest.raises(ImportError, match=rf"pip install 'smoothce\[{library}\]'"):
        importlib.import_module(f"smoothce.integrations.{library}")
