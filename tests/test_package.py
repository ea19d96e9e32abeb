"""The package itself: standard library only, Python 3.8 syntax, imports pointing down."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "proxy_llm")

# Modules that must not import anything from the package (STYLE.md: they stand alone).
LEAVES = {"config", "wire", "sse", "metrics", "storage", "errors", "headers", "sniff", "depth", "memo"}
# Modules that may import only these from the package.
ONLY = {"upstream": {"headers"}, "notices": {"storage", "upstream"}}
# Lower layers may not import higher ones.
FORBIDDEN = {
    "record": {"handler", "server", "cli"},
    "notices": {"record", "handler", "server", "cli"},
    "handler": {"server", "cli"},
    "server": {"cli"},
    "dialects": {"record", "handler", "server", "cli", "storage"},
}


def source(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def modules():
    for d, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, PKG)[:-3].replace(os.sep, ".")
                yield rel.replace(".__init__", "") if rel != "__init__" else "__init__", path


def package_imports(path):
    tree = ast.parse(source(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = node.module.split(".")[0] if node.module else None
                if base:
                    out.add(base)
                else:
                    out.update(a.name for a in node.names)
            elif node.module and node.module.startswith("proxy_llm"):
                parts = node.module.split(".")
                out.add(parts[1] if len(parts) > 1 else "__init__")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("proxy_llm."):
                    out.add(a.name.split(".")[1])
    return out


class PackageTest(unittest.TestCase):
    def test_every_module_imports_with_the_bare_standard_library(self):
        names = ["proxy_llm." + m for m, _ in modules() if m not in ("__main__", "__init__")]
        code = "import importlib, sys\nfor n in %r: importlib.import_module(n)\nprint('ok')" % names
        out = subprocess.run([sys.executable, "-E", "-s", "-S", "-c", "import sys; sys.path.insert(0, %r)\n" % ROOT + code],
                             capture_output=True, cwd=ROOT, timeout=60)
        self.assertEqual(out.returncode, 0, out.stderr.decode())
        self.assertEqual(out.stdout.strip(), b"ok")

    def test_no_third_party_imports(self):
        stdlib = getattr(sys, "stdlib_module_names", None)
        if stdlib is None:
            self.skipTest("sys.stdlib_module_names needs Python 3.10")
        for name, path in modules():
            tree = ast.parse(source(path))
            for node in ast.walk(tree):
                mods = []
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level:
                    mods = [node.module]
                for mod in mods:
                    top = mod.split(".")[0]
                    with self.subTest(module=name, imports=mod):
                        self.assertTrue(top in stdlib or top in ("proxy_llm", "__future__"), mod)

    def test_layering(self):
        for name, path in modules():
            imported = package_imports(path)
            top = name.split(".")[0]
            with self.subTest(module=name):
                if top in LEAVES:
                    self.assertEqual(imported - {"__init__"}, set(), "%s must not import the package" % name)
                if top in ONLY:
                    self.assertEqual(imported - {"__init__"} - ONLY[top], set(), "%s imports too much" % name)
                for bad in FORBIDDEN.get(top, ()):
                    self.assertNotIn(bad, imported)

    def test_sources_parse_as_python_3_8(self):
        if sys.version_info < (3, 8):
            self.skipTest("needs 3.8+")
        for name, path in modules():
            with self.subTest(module=name):
                ast.parse(source(path), feature_version=(3, 8))


if __name__ == "__main__":
    unittest.main()
