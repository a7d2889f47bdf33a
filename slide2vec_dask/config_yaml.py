"""YAML as a run configuration reads it: PyYAML's safe loader, made strict in three ways.

* Only ``true`` / ``false`` (also ``True``, ``TRUE``, ``False``, ``FALSE``) are booleans, as in
  YAML 1.2 and as `slide2vec_dask.config.check_bool` has it; YAML 1.1's ``yes/no/on/off`` stay
  strings, which a boolean option then refuses — the file, the overrides and the Python API
  agree on what a boolean is.
* A key given twice in one mapping (a second ``overwrite:``, a second ``execution:``
  section) is refused with both lines, instead of YAML's silent last-wins.
* Aliases (``*name``) are refused: a few hundred bytes of nested aliases ("billion laughs")
  expand to 10**9 items, which any message or copy of the value would walk.  A
  configuration has no need for them; anchors without aliases are harmless.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from slide2vec_dask.config import shown

BOOL_TAG = "tag:yaml.org,2002:bool"


class ConfigYAMLError(ValueError):
    """A YAML document this loader refuses (duplicate key, alias); the message names the line."""


class StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` with YAML 1.2 booleans, unique keys and no aliases."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != BOOL_TAG]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigYAMLError(f"line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not "
                                  "accepted in a configuration; write the value out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the safe loader's own error names it
                continue
            if first is not None:
                lines = f"line {line}" if first == line else f"lines {first} and {line}"
                raise ConfigYAMLError(f"duplicate key {shown(key)} ({lines}); a key may appear once in a "
                                      "mapping: keep one")
            seen[key] = line
        return super().construct_mapping(node, deep)


StrictLoader.add_implicit_resolver(BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def load(text: str) -> Any:
    """One YAML document, strictly (see the module); `ConfigYAMLError` or `yaml.YAMLError` when refused."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
