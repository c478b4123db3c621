"""Check the import structure of vhostnet, testkit, bench and fuzz without importing anything.

``python -m tools.check_imports [--root DIR]`` parses every module with ``ast``,
collects every import (module level, inside functions, under ``TYPE_CHECKING``;
relative imports resolved) and fails, one line per problem naming file:line, on:

- an import cycle among module-level imports (imports inside functions and under
  ``TYPE_CHECKING`` do not run at import time, so they cannot close a cycle);
- an import the layer table below forbids (checked for every import, lazy ones too);
- ``vhostnet`` importing testkit, bench, tools or tests;
- a private name of another package: ``from m import _x``, ``import p._m``, or
  ``m._x`` on a module bound by an import. The compiled kernels declared in
  setup.py (``vhostnet.tcp._fast`` ...) are private modules too: only their own
  package imports them.

Exit status 0 with a one-line summary when nothing is wrong, 1 otherwise.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# The trees checked; tools/ and tests/ may import anything.
PACKAGES = ("vhostnet", "testkit", "bench", "fuzz")

# --- the architecture's layer rules ------------------------------------------
# Layer -> the other layers it may import. A layer may always import itself, and
# the standard library. "*" means every layer of vhostnet.
LAYER_IMPORTS: dict[str, tuple[str, ...]] = {
    # Rate-limited logging: part of the vhost-user library (which must stand
    # alone, so it cannot import it from elsewhere), stdlib only, used by all.
    "ratelimit": (),
    "vhost_user": ("ratelimit",),
    "wire": (),
    "virtqueue": (),
    "stack": ("wire",),
    # The one place outbound host sockets are opened (-o, --outbound-if4/6), for tcp and hostio.
    "outbound": (),
    "tcp": ("stack", "wire", "outbound"),
    "hostio": ("stack", "wire", "outbound"),
    # The network takes guest frames as the rings' FrameBatch (virtqueue).
    "network": ("stack", "tcp", "hostio", "wire", "virtqueue"),
    # Packet capture (-p/--pcap): a file writer, fed by the devices.
    "capture": (),
    "device": ("virtqueue", "vhost_user", "wire", "stack", "network", "capture"),
    # Stream mode (-netdev stream): the stream counterpart of device.
    "stream": ("virtqueue", "vhost_user", "wire", "network", "capture"),
    # Migration registers its control-socket commands (control).
    # Several guests: the switch's ports and every guest's Network (issue 16).
    "guests": ("network", "stack", "virtqueue", "vhost_user", "wire"),
    "migration": ("network", "tcp", "stack", "hostio", "wire", "vhost_user", "control"),
    "server": ("device", "stream", "capture", "network", "guests", "vhost_user", "stack",
               "virtqueue"),
    "control": ("device", "network", "guests", "vhost_user", "stack", "virtqueue"),
    "cli": ("*",),
    "root": (),  # vhostnet/__init__.py
    "testkit": ("vhost_user", "wire"),
    "bench": ("*", "testkit"),
    # Fuzz targets drive any layer; guest memory and rings come from the test kit.
    "fuzz": ("*", "testkit"),
}
# Layers that may use no third-party package but these (None: any).
THIRD_PARTY: dict[str, tuple[str, ...] | None] = {
    "vhost_user": ("numpy",),
    "wire": ("numpy",),
    "virtqueue": ("numpy",),
    "testkit": ("numpy",),
}
# Which layer a module is in: the first match of these prefixes.
LAYER_OF_PREFIX: tuple[tuple[str, str], ...] = (
    ("vhostnet.vhost_user.ratelimit", "ratelimit"),
    ("vhostnet.vhost_user", "vhost_user"),
    ("vhostnet.wire", "wire"),
    ("vhostnet.virtqueue", "virtqueue"),
    ("vhostnet.stack", "stack"),
    ("vhostnet.outbound", "outbound"),
    ("vhostnet.tcp", "tcp"),
    ("vhostnet.hostio", "hostio"),
    ("vhostnet.network", "network"),
    ("vhostnet.guest_queue", "network"),  # the guest frame queue Network owns
    ("vhostnet.capture", "capture"),
    ("vhostnet.device_rx", "device"),
    ("vhostnet.device_watch", "device"),
    ("vhostnet.device", "device"),
    ("vhostnet.stream", "stream"),
    ("vhostnet._stream", "stream"),  # its kernel (ext/stream.pyx)
    ("vhostnet.guests", "guests"),
    ("vhostnet.migration", "migration"),
    ("vhostnet.server", "server"),
    ("vhostnet.control", "control"),
    ("vhostnet.cli", "cli"),
    ("vhostnet.ctl", "cli"),
    ("vhostnet.options", "cli"),
    ("vhostnet.option_checks", "cli"),
    ("vhostnet.options_guests", "cli"),
    ("vhostnet.host_interfaces", "cli"),
    ("vhostnet.daemon", "cli"),
    ("vhostnet.sandbox", "cli"),
    ("vhostnet.__main__", "cli"),
    ("testkit", "testkit"),
    ("bench", "bench"),
    ("fuzz", "fuzz"),
)
# Never imported by vhostnet: they are not shipped.
NOT_SHIPPED = ("testkit", "bench", "tools", "tests", "fuzz")
# --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    """One imported module (and, for ``from m import name``, the name)."""

    line: int
    target: str  # the most specific module the statement imports
    name: str | None  # for ``from m import name`` when name is not a module itself
    runs_at_import: bool  # module level, not under TYPE_CHECKING


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    tree: ast.Module

    @property
    def package(self) -> str:
        return self.name if self.is_package else self.name.rpartition(".")[0]


def layer_of(module: str) -> str | None:
    if module == "vhostnet":
        return "root"
    for prefix, layer in LAYER_OF_PREFIX:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return None


def is_private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def discover(root: Path) -> dict[str, Module]:
    modules: dict[str, Module] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            name = ".".join(parts)
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            modules[name] = Module(name, path, is_package, tree)
    return modules


def compiled_kernels(root: Path) -> set[str]:
    """Module names of the ``Extension(...)`` entries in setup.py (read, not run)."""
    setup = root / "setup.py"
    if not setup.exists():
        return set()
    kernels = set()
    for node in ast.walk(ast.parse(setup.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "Extension" and node.args
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            kernels.add(node.args[0].value)
    return kernels


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


class _Collector(ast.NodeVisitor):
    """Every import of one module, with whether it runs when the module is imported."""

    def __init__(self, module: Module, known: set[str]) -> None:
        self.module = module
        self.known = known
        self.imports: list[Import] = []
        self.bindings: dict[str, str] = {}  # local name -> the module or module.name bound
        self._deferred = 0  # depth inside functions or TYPE_CHECKING blocks

    def _visit_deferred(self, nodes: list[ast.stmt] | list[ast.AST]) -> None:
        self._deferred += 1
        for node in nodes:
            self.visit(node)
        self._deferred -= 1

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for decorator in node.decorator_list:
            self.visit(decorator)
        self._visit_deferred(node.body)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self._visit_deferred(node.body)
            for statement in node.orelse:
                self.visit(statement)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node.lineno, alias.name, None)
            if alias.asname:
                self.bindings[alias.asname] = alias.name
            else:
                top = alias.name.partition(".")[0]
                self.bindings[top] = top

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self._resolve(node)
        for alias in node.names:
            candidate = f"{base}.{alias.name}"
            if candidate in self.known:
                self._add(node.lineno, candidate, None)
                self.bindings[alias.asname or alias.name] = candidate
            else:
                self._add(node.lineno, base, alias.name)
                self.bindings[alias.asname or alias.name] = candidate

    def _resolve(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        parts = self.module.package.split(".")
        if node.level > 1:
            parts = parts[: len(parts) - (node.level - 1)]
        return ".".join(parts + ([node.module] if node.module else []))

    def _add(self, line: int, target: str, name: str | None) -> None:
        self.imports.append(Import(line, target, name, runs_at_import=self._deferred == 0))


def _attribute_chain(node: ast.Attribute) -> list[str] | None:
    """``a.b.c`` -> ["a", "b", "c"]; None when the chain does not start at a name."""
    parts = [node.attr]
    value = node.value
    while isinstance(value, ast.Attribute):
        parts.append(value.attr)
        value = value.value
    if not isinstance(value, ast.Name):
        return None
    parts.append(value.id)
    return parts[::-1]


class Checker:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.modules = discover(root)
        self.kernels = compiled_kernels(root)
        self.known = set(self.modules) | self.kernels
        self.problems: list[str] = []
        self.imports: dict[str, list[Import]] = {}
        self.bindings: dict[str, dict[str, str]] = {}
        for module in self.modules.values():
            collector = _Collector(module, self.known)
            collector.visit(module.tree)
            self.imports[module.name] = collector.imports
            self.bindings[module.name] = collector.bindings

    def report(self, module: Module, line: int, message: str) -> None:
        self.problems.append(f"{module.path.relative_to(self.root)}:{line}: {message}")

    def run(self) -> list[str]:
        for name, module in self.modules.items():
            if layer_of(name) is None:
                self.report(module, 1, f"{name} is in no layer: add it to LAYER_OF_PREFIX in "
                                       "tools/check_imports.py")
            for imported in self.imports[name]:
                self.check_layer(module, imported)
                self.check_private_import(module, imported)
            self.check_private_attributes(module)
        self.check_cycles()
        return self.problems

    # --- (b), (c): layers ------------------------------------------------------

    def check_layer(self, module: Module, imported: Import) -> None:
        importer = layer_of(module.name)
        top = imported.target.partition(".")[0]
        if importer is None:
            return  # reported once by run()
        if module.name.startswith("vhostnet") and top in NOT_SHIPPED:
            self.report(module, imported.line,
                        f"vhostnet must not import {top} (not shipped): {imported.target}")
            return
        if top in PACKAGES:
            target = layer_of(imported.target)
            if target is None or target == importer:
                return
            allowed = LAYER_IMPORTS[importer]
            if target == "ratelimit" or target in allowed or (
                    "*" in allowed and imported.target.startswith("vhostnet")):
                return
            self.report(module, imported.line,
                        f"layer {importer} ({module.name}) must not import layer {target} "
                        f"({imported.target})")
            return
        third_party = THIRD_PARTY.get(importer)
        if (third_party is not None and top not in sys.stdlib_module_names
                and top not in third_party and top != "__future__"):
            self.report(module, imported.line,
                        f"layer {importer} ({module.name}) may use only the standard library"
                        f" and {', '.join(third_party)}, not {top}")

    # --- (d): private names ----------------------------------------------------

    def _private_owner(self, dotted: str) -> str | None:
        """The package owning the first private part of ``dotted``, if it has one.

        A private module belongs to its package; a private name (of a module, or of a
        class in it) belongs to the package of the module that defines it.
        """
        parts = dotted.split(".")
        for index, part in enumerate(parts):
            if not is_private(part):
                continue
            for end in range(index, 0, -1):
                prefix = ".".join(parts[:end])
                if prefix in self.modules and self.modules[prefix].is_package:
                    return prefix
                if prefix in self.known:
                    return prefix.rpartition(".")[0]
            return ".".join(parts[:index])
        return None

    def _foreign(self, module: Module, owner: str) -> bool:
        return owner.partition(".")[0] in PACKAGES and owner != module.package

    def check_private_import(self, module: Module, imported: Import) -> None:
        dotted = imported.target + (f".{imported.name}" if imported.name else "")
        owner = self._private_owner(dotted)
        if owner is not None and self._foreign(module, owner):
            self.report(module, imported.line,
                        f"private name of package {owner} imported from {module.package}: {dotted}")

    def check_private_attributes(self, module: Module) -> None:
        bindings = self.bindings[module.name]
        for node in ast.walk(module.tree):
            if not isinstance(node, ast.Attribute) or not is_private(node.attr):
                continue
            chain = _attribute_chain(node)
            if chain is None or chain[0] not in bindings:
                continue
            # Resolve as far as the chain names modules: bound name, then submodules;
            # the last step before the private name may also be a class imported by name.
            target = bindings[chain[0]]
            for part in chain[1:-1]:
                if f"{target}.{part}" not in self.known:
                    break
                target = f"{target}.{part}"
            else:
                owner = self._private_owner(f"{target}.{chain[-1]}")
                if owner is not None and self._foreign(module, owner):
                    self.report(module, node.lineno,
                                f"private name of package {owner} used from {module.package}: "
                                f"{'.'.join(chain)}")

    # --- (a): cycles -----------------------------------------------------------

    def check_cycles(self) -> None:
        graph: dict[str, dict[str, int]] = {name: {} for name in self.modules}
        for name, imports in self.imports.items():
            for imported in imports:
                if imported.runs_at_import and imported.target in self.modules:
                    graph[name].setdefault(imported.target, imported.line)
        for component in _strongly_connected(graph):
            if len(component) == 1 and component[0] not in graph[component[0]]:
                continue
            cycle = _one_cycle(graph, sorted(component))
            first = self.modules[cycle[0]]
            self.report(first, graph[cycle[0]][cycle[1]],
                        f"import cycle: {' -> '.join(cycle)}")


def _strongly_connected(graph: dict[str, dict[str, int]]) -> Iterator[list[str]]:
    """Tarjan's algorithm, iterative (the graph is small, but recursion limits are not)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = counter
                    counter += 1
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    yield component


def _one_cycle(graph: dict[str, dict[str, int]], component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first)."""
    members = set(component)
    start = component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for successor in sorted(graph[node]):
                if successor == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return path[::-1] + [start]
                if successor in members and successor not in previous:
                    previous[successor] = node
                    following.append(successor)
        frontier = following
    return [start, start]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the source tree to check (default: this checkout)")
    args = parser.parse_args(argv)
    checker = Checker(args.root.resolve())
    problems = checker.run()
    for problem in problems:
        print(problem)
    if problems:
        print(f"check_imports: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    count = sum(len(imports) for imports in checker.imports.values())
    print(f"check_imports: {len(checker.modules)} modules, {count} imports, no cycle, "
          "no forbidden or private import")
    return 0


if __name__ == "__main__":
    sys.exit(main())
