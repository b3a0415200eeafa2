"""Build hook: ship ``mergekit_ctm.pth`` (the startup hook) in wheels and editable installs.

The .pth line imports the tiny top-level module ``mergekit_ctm_hook`` (no torch, no mergekit),
which plugs our methods into an unmodified ``mergekit-yaml``. Everything else is configured in
pyproject.toml.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "mergekit_ctm.pth"
# Sorted after setuptools' "__editable__.*.pth", so the editable finder is already in place.
PTH_LINE = "import mergekit_ctm_hook; mergekit_ctm_hook.install_from_pth()\n"


class BuildPyWithPth(build_py):
    """build_py that also writes the .pth at the root of the install (purelib)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            # Editable wheels take non-module files from the unpacked-wheel dir (install_lib).
            target = self.get_finalized_command("install").install_lib
        else:
            target = self.build_lib
        os.makedirs(target, exist_ok=True)
        path = os.path.join(target, PTH_NAME)
        with open(path, "w", encoding="utf-8") as f:
            f.write(PTH_LINE)
        self._pth_outputs = [path]

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + getattr(self, "_pth_outputs", [])


setup(cmdclass={"build_py": BuildPyWithPth})
