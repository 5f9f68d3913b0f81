"""Only the build hook: everything else is in pyproject.toml."""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithData(build_py):
    """Copy the top-level conf/ and assets/ into the wheel as surf_train/_data/{conf,assets}.

    They stay top-level in the checkout (where users read and edit them); surf_train.DATA_DIR finds the copy in
    an installed wheel and the originals in a checkout or an editable install (which copies nothing)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for name in ("conf", "assets"):
            dst = os.path.join(self.build_lib, "surf_train", "_data", name)
            shutil.rmtree(dst, ignore_errors=True)  # an earlier build's copy in build/ may hold files since removed
            if os.path.isdir(name):
                self.copy_tree(name, dst)


setup(cmdclass={"build_py": BuildPyWithData})
