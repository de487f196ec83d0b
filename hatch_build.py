"""Build hook: the committed man pages go to the environment's share/man/manN/.

Each page in man/ is installed by its section suffix (mars.1 → share/man/man1/mars.1,
mars-records.5 → share/man/man5/), for wheels and editable installs alike, so `man mars`
works after either `pip install` or `pip install -e`. New pages are picked up by name;
nothing here lists the commands.
"""

from __future__ import annotations

from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class ManPages(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        man = Path(self.root) / "man"
        shared = build_data.setdefault("shared_data", {})
        for page in sorted(man.glob("*.[1-9]")):
            shared[str(page)] = f"share/man/man{page.suffix[1:]}/{page.name}"
