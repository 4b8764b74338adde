"""Bundles libhdb into the package at build time: the file named by HDB_LIBRARY (e.g. an
installed PREFIX/lib/libhdb.so.1), or else target/release/libhdb.so built with cargo from this
repository. The package's loader (hdb/_capi.py) finds the bundled copy first."""

import os
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


class BuildWithLibrary(build_py):
    def run(self):
        super().run()
        src = os.environ.get("HDB_LIBRARY")
        if not src:
            subprocess.check_call(["cargo", "build", "--release", "--lib"], cwd=REPO)
            src = os.path.join(REPO, "target", "release", "libhdb.so")
        dst = os.path.join(self.build_lib, "hdb", "libhdb.so.1")
        shutil.copyfile(src, dst)


setup(cmdclass={"build_py": BuildWithLibrary})
