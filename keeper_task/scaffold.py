"""``keeper-task new``: create a job-task project from the template tree (tooling).

The template tree lives in the repository's top-level ``templates/`` directory and is copied
into the wheel as ``keeper_task/_templates`` (hatchling ``force-include``). An editable install
never sees ``force-include``, so :func:`templates_root` looks in both places.

Names, and why each rule exists:

* **job id** (``NAME``): ``[A-Za-z][A-Za-z0-9-]*``, at most 64 characters, no trailing ``-``.
  The agent's broker splits MQTT client ids on ``_`` to find the job id, so ``_`` would make the
  task speak as another job; the id is also the job file name and part of topic names.
* **module**: a Python identifier, not a keyword, not a standard-library module name (it would
  shadow it). Derived from the id by turning ``-`` into ``_`` and lower-casing.
* **command**: ``[A-Za-z][A-Za-z0-9_-]*``, at most 64 characters, not a reserved Windows device
  name. It names ``Jobs/bin/<Command>/<Command>[.exe]``; the agent wants a bare name (no path,
  no extension). Derived from the id in PascalCase (``demo-task`` -> ``DemoTask``).

Every generated path is checked to stay inside the project directory, no existing symlink is
written through, and a relative ``--dir`` may not climb out of the current directory.
"""

from __future__ import annotations

import json
import keyword
import os
import re
import stat
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from keeper_task.errors import SettingsError, UsageError

if TYPE_CHECKING:
    if sys.version_info >= (3, 11):
        from importlib.resources.abc import Traversable
    else:
        from importlib.abc import Traversable

__all__ = [
    "DEFAULT_KEEPER_TASK_SPEC",
    "INSTALL_ROOTS",
    "OS_NAMES",
    "ProjectSpec",
    "create_project",
    "current_os",
    "detect_keeper_task_spec",
    "job_definition",
    "job_file_name",
    "make_spec",
    "render",
    "templates_root",
]

#: Dependency line of a new project when nothing better is known (see
#: :func:`detect_keeper_task_spec`).
DEFAULT_KEEPER_TASK_SPEC = "keeper-task>=0.1"

#: The OS names ``--os`` accepts, in the order job files are written.
OS_NAMES: tuple[str, ...] = ("windows", "linux", "macos")

#: Documented default install roots of the agent, per OS (agent-facts section 1).
INSTALL_ROOTS: Mapping[str, str] = {
    "windows": "C:\\Program Files\\KeeperPrivilegeManager",
    "linux": "/opt/KeeperPrivilegeManager",
    "macos": "/usr/local/KeeperPrivilegeManager",
}

# osFilter keys exactly as the agent's examples spell them.
_OS_FILTER_KEYS: Mapping[str, str] = {"windows": "windows", "linux": "linux", "macos": "macOS"}

_JOB_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,63}$")
_COMMAND_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
_PLACEHOLDER_RE = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")
_WINDOWS_RESERVED = frozenset(
    ["con", "prn", "aux", "nul"]
    + [f"com{i}" for i in range(1, 10)]
    + [f"lpt{i}" for i in range(1, 10)]
)
# Names a new module must not take: they would shadow the framework or the test runner.
_RESERVED_MODULES = frozenset({"keeper_task", "tests", "test", "pytest", "conftest", "setup"})
# Files the template tree may hold that are never project content.
_IGNORED_TEMPLATE_NAMES = frozenset({"__pycache__", ".DS_Store"})
_TEMPLATE_SUFFIX = ".tmpl"
_PROJECT_TEMPLATE = "project"


@dataclass(frozen=True)
class ProjectSpec:
    """Everything a new project is generated from (already validated by :func:`make_spec`).

    Attributes:
        job_id: The job id (also the project name and the job file name).
        module: The Python package name under ``src/``.
        command: The agent's ``command``: names ``Jobs/bin/<command>/<command>[.exe]``.
        class_name: The Task subclass; its settings class is ``<class_name>Settings``.
        oses: The OSes to write a job file for.
        publishes: Extra topics the task publishes (besides KeeperLogger and the event topic).
        keeper_task_spec: The keeper-task requirement line of the new pyproject.toml.
    """

    job_id: str
    module: str
    command: str
    class_name: str
    oses: tuple[str, ...] = OS_NAMES
    publishes: tuple[str, ...] = ()
    keeper_task_spec: str = DEFAULT_KEEPER_TASK_SPEC
    title: str = field(default="")
    #: Why the keeper-task requirement is what it is (one sentence for the README).
    keeper_task_origin: str = field(default="")

    @property
    def event_topic(self) -> str:
        """The job's event topic (the agent's default form)."""
        return f"Jobs/{self.job_id}/events"

    @property
    def topics(self) -> tuple[str, ...]:
        """Every topic the task publishes: KeeperLogger, the event topic, declared topics."""
        seen: list[str] = []
        for topic in ("KeeperLogger", self.event_topic, *self.publishes):
            if topic not in seen:
                seen.append(topic)
        return tuple(seen)


def current_os() -> str:
    """Return this machine's OS as one of :data:`OS_NAMES`.

    Raises:
        SettingsError: The agent runs on none of those OSes.
    """
    if sys.platform.startswith("win"):
        return "windows"
    if sys.platform == "darwin":
        return "macos"
    if sys.platform.startswith("linux"):
        return "linux"
    raise SettingsError(
        f"unsupported platform {sys.platform!r}: the agent runs on Windows, Linux and macOS"
    )


def _pascal(text: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[-_]+", text) if part)


def check_job_id(job_id: str) -> str:
    """Return ``job_id`` if the agent accepts it; raise :class:`UsageError` otherwise."""
    if "_" in job_id:
        raise UsageError(
            f"job id {job_id!r} contains '_': the agent's broker splits MQTT client ids on '_', "
            f"so use hyphens (e.g. {job_id.replace('_', '-')!r})"
        )
    if not _JOB_ID_RE.match(job_id) or job_id.endswith("-"):
        raise UsageError(
            f"invalid job id {job_id!r}: use a letter then letters, digits and '-' "
            "(at most 64 characters, no trailing '-'), e.g. 'disk-report'"
        )
    return job_id


def check_module(module: str) -> str:
    """Return ``module`` if it can be a new top-level package; raise :class:`UsageError`."""
    if not module.isidentifier() or not module.isascii() or keyword.iskeyword(module):
        raise UsageError(
            f"invalid module name {module!r}: it must be a Python identifier (letters, digits, "
            "'_', not starting with a digit, not a keyword); pass --module NAME"
        )
    if module in sys.stdlib_module_names or module in _RESERVED_MODULES:
        raise UsageError(
            f"module name {module!r} would shadow the module of that name; pass --module NAME"
        )
    return module


def check_command(command: str) -> str:
    """Return ``command`` if the agent can launch it; raise :class:`UsageError` otherwise."""
    if not _COMMAND_RE.match(command):
        raise UsageError(
            f"invalid command name {command!r}: use a letter then letters, digits, '-' or '_' "
            "(at most 64 characters; no path, no extension), e.g. 'DiskReport'"
        )
    if command.lower() in _WINDOWS_RESERVED:
        raise UsageError(f"command name {command!r} is a reserved device name on Windows")
    return command


def check_topic(topic: str) -> str:
    """Return ``topic`` if a task may publish to it; raise :class:`UsageError` otherwise."""
    if not topic or len(topic.encode()) > 65535:
        raise UsageError("a published topic cannot be empty")
    if any(ch in topic for ch in "+#\0") or topic.startswith("$"):
        raise UsageError(
            f"invalid topic {topic!r}: a publish topic has no wildcards ('+', '#'), "
            "no NUL and does not start with '$'"
        )
    if any(ord(ch) < 32 for ch in topic) or '"' in topic or "\\" in topic:
        raise UsageError(
            f"invalid topic {topic!r}: control characters, quotes and '\\' are refused"
        )
    return topic


_SPEC_RE = re.compile(
    r"^\s*keeper[-_.]task(\s*\[[^\]]*\])?(?P<rest>\s*(@\s*\S+|[<>=!~][^;]*)?)\s*$", re.I
)


def _check_spec_line(spec: str) -> str:
    # The line is written into TOML: refuse anything that could break out of the string.
    if any(ch in spec for ch in "\"'\\\n\r`$") or not _SPEC_RE.match(spec):
        raise UsageError(
            f"invalid --keeper-task-spec {spec!r}: give one requirement on keeper-task such as "
            "'keeper-task>=0.1' or 'keeper-task @ file:///path/to/checkout'"
        )
    return spec.strip()


def _with_dev_extra(spec: str) -> str:
    """``keeper-task>=0.1`` -> ``keeper-task[emulator]>=0.1`` (same source, plus the emulator)."""
    match = _SPEC_RE.match(spec)
    rest = match.group("rest").strip() if match else ""
    if rest.startswith("@"):
        return f"keeper-task[emulator] {rest}"
    return f"keeper-task[emulator]{rest}"


def _version_range(version: str) -> str:
    """``0.1.0`` -> ``keeper-task>=0.1.0,<0.2``; ``1.4.2`` -> ``keeper-task>=1.4.2,<2``."""
    parts = [int(p) for p in re.findall(r"\d+", version.partition("+")[0])[:3]] or [0]
    parts += [0] * (3 - len(parts))
    base = ".".join(str(p) for p in parts)
    upper = f"0.{parts[1] + 1}" if parts[0] == 0 else str(parts[0] + 1)
    return f"keeper-task>={base},<{upper}"


def detect_keeper_task_spec() -> tuple[str, str]:
    """The keeper-task requirement a new project needs to get *this* keeper-task, and why.

    Read from the running keeper-task's install record (PEP 610 ``direct_url.json``):

    * installed from a package index (no record): a version range around this version;
    * from a local checkout, directory or wheel (``file:`` URL; editable or not): a direct
      reference to it (``keeper-task @ file:///...``), which no index would resolve;
    * from a VCS or an archive URL: a direct reference to that URL (and commit).

    Returns:
        ``(requirement, one sentence saying where it points and why)``.
    """
    from importlib import metadata

    from keeper_task import __version__

    try:
        dist = metadata.distribution("keeper-task")
    except metadata.PackageNotFoundError:
        return (
            _version_range(__version__),
            f"keeper-task {__version__} runs from source without being installed, so the "
            "project asks a package index for a compatible version",
        )
    raw = dist.read_text("direct_url.json")
    info: dict[str, object] = {}
    if raw:
        try:
            loaded = json.loads(raw)
        except ValueError:
            loaded = None
        if isinstance(loaded, dict):
            info = loaded
    url = info.get("url")
    if not isinstance(url, str) or not url:
        return (
            _version_range(dist.version),
            f"keeper-task {dist.version} was installed from a package index, so the project "
            "asks the index for a compatible version",
        )
    vcs = info.get("vcs_info")
    if isinstance(vcs, dict) and isinstance(vcs.get("vcs"), str):
        commit = vcs.get("commit_id")
        ref = f"@{commit}" if isinstance(commit, str) and commit else ""
        return (
            f"keeper-task @ {vcs['vcs']}+{url}{ref}",
            f"keeper-task was installed from {vcs['vcs']} ({url}), so the project installs "
            "that same revision",
        )
    if url.startswith("file:"):
        kind = "wheel" if url.endswith(".whl") else "local checkout"
        return (
            f"keeper-task @ {url}",
            f"keeper-task was installed from a {kind} ({url}), which no package index holds, "
            "so the project installs it from there",
        )
    return (
        f"keeper-task @ {url}",
        f"keeper-task was installed from {url}, so the project installs it from there",
    )


def make_spec(
    name: str,
    *,
    module: str | None = None,
    command: str | None = None,
    oses: Sequence[str] | None = None,
    publishes: Sequence[str] = (),
    keeper_task_spec: str = DEFAULT_KEEPER_TASK_SPEC,
    keeper_task_origin: str = "",
) -> ProjectSpec:
    """Validate the names of a new project and derive the missing ones.

    Args:
        name: The job id, also the project's name.
        module: The Python package name (default: from ``name``).
        command: The agent's command name (default: ``name`` in PascalCase).
        oses: OSes to write job files for (default: all three).
        publishes: Extra topics the task publishes.
        keeper_task_spec: The keeper-task requirement of the new project.
        keeper_task_origin: Why that requirement (a sentence for the generated README).

    Raises:
        UsageError: A name, OS or topic is not acceptable; the message says why.
    """
    job_id = check_job_id(name)
    mod = check_module(module if module is not None else job_id.lower().replace("-", "_"))
    cmd = check_command(command if command is not None else _pascal(job_id))
    class_name = _pascal(job_id)
    chosen: list[str] = []
    for os_name in oses if oses is not None else OS_NAMES:
        key = os_name.strip().lower()
        if key == "mac":
            key = "macos"
        if key not in OS_NAMES:
            raise UsageError(f"unknown OS {os_name!r}: choose from {', '.join(OS_NAMES)}")
        if key not in chosen:
            chosen.append(key)
    if not chosen:
        raise UsageError(f"--os needs at least one of {', '.join(OS_NAMES)}")
    topics: list[str] = []
    for topic in publishes:
        check_topic(topic)
        if topic not in topics:
            topics.append(topic)
    title = " ".join(part.capitalize() for part in job_id.split("-") if part)
    return ProjectSpec(
        job_id=job_id,
        module=mod,
        command=cmd,
        class_name=class_name,
        oses=tuple(o for o in OS_NAMES if o in chosen),
        publishes=tuple(topics),
        keeper_task_spec=_check_spec_line(keeper_task_spec),
        title=title,
        keeper_task_origin=keeper_task_origin
        or "the requirement was given when the project was created",
    )


# --- templates ------------------------------------------------------------------------------


def templates_root() -> Traversable:
    """Return the template tree: the wheel's copy, else the source checkout's ``templates/``.

    Raises:
        SettingsError: Neither exists (a broken install).
    """
    packaged = resources.files("keeper_task").joinpath("_templates")
    if packaged.is_dir():
        return packaged
    # Source checkout or editable install: templates/ sits next to the package directory.
    checkout = Path(__file__).resolve().parent.parent / "templates"
    if checkout.is_dir():
        return checkout
    raise SettingsError(
        "keeper-task's templates are missing (neither keeper_task/_templates nor the checkout's "
        "templates/ exists): reinstall keeper-task"
    )


def render(text: str, values: Mapping[str, str], *, source: str = "template") -> str:
    """Replace every ``{{ name }}`` in ``text`` with ``values[name]``.

    Raises:
        SettingsError: The template uses a name ``values`` does not define.
    """

    def _sub(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise SettingsError(f"{source} uses unknown placeholder {{{{ {key} }}}}")
        return values[key]

    return _PLACEHOLDER_RE.sub(_sub, text)


def _walk(node: Traversable, prefix: PurePosixPath) -> Iterator[tuple[PurePosixPath, Traversable]]:
    for child in sorted(node.iterdir(), key=lambda c: c.name):
        if child.name in _IGNORED_TEMPLATE_NAMES or child.name.endswith(".pyc"):
            continue
        if child.is_dir():
            yield from _walk(child, prefix / child.name)
        else:
            yield prefix / child.name, child


def template_values(spec: ProjectSpec) -> dict[str, str]:
    """The placeholder values the project templates may use."""
    extra = "".join(f"        {json.dumps(t)},\n" for t in spec.publishes)
    return {
        "job_id": spec.job_id,
        "module": spec.module,
        "command": spec.command,
        "class_name": spec.class_name,
        "title": spec.title,
        "event_topic": spec.event_topic,
        "keeper_task_spec": spec.keeper_task_spec,
        "keeper_task_dev_spec": _with_dev_extra(spec.keeper_task_spec),
        "keeper_task_origin": spec.keeper_task_origin,
        "extra_publishes": extra,
        "topics_list": ", ".join(f"`{t}`" for t in spec.topics),
        "oses": ",".join(spec.oses),
        "first_os": current_os() if current_os() in spec.oses else spec.oses[0],
    }


def job_file_name(spec: ProjectSpec, os_name: str) -> PurePosixPath:
    """Where the job file for ``os_name`` lives in a project: ``jobs/<os>/<job id>.json``.

    One directory per OS because every variant keeps the same id, and the file name must
    equal the id.
    """
    return PurePosixPath("jobs", os_name, f"{spec.job_id}.json")


def job_definition(spec: ProjectSpec, os_name: str) -> dict[str, object]:
    """Return the job JSON for ``os_name`` (same id on every OS; ``osFilter`` selects it).

    The task names only its ``command``: the agent looks for
    ``<agent root>/Jobs/bin/<command>/<command>[.exe]`` (the documented layout the build and
    the deploy scripts use), so the job works under any install root. An ``executablePath``
    would pin one root: the agent then wants the binary at exactly that path, and a
    non-default install (or a rehearsal against ``keeper-task dev agent``) would not find it.
    """
    return {
        "id": spec.job_id,
        "name": spec.title,
        "description": f"{spec.title}: a keeper-task job task.",
        "enabled": True,
        "priority": 5,
        "schedule": {"intervalMinutes": 1440},
        "events": [],
        "osFilter": {key: name == os_name for name, key in _OS_FILTER_KEYS.items()},
        "eventTopic": spec.event_topic,
        "mqttTopics": {"allowedPublications": list(spec.topics), "allowedSubscriptions": []},
        "parameters": [],
        "tasks": [
            {
                "id": "run",
                "name": spec.title,
                "ExecutionType": "Service",
                "command": spec.command,
                "arguments": "--keeper-api-base={KeeperApiBaseUrl}",
                "timeoutSeconds": 300,
                "continueOnFailure": False,
                "scriptType": "Auto",
            }
        ],
    }


def project_files(spec: ProjectSpec, root: Traversable | None = None) -> dict[PurePosixPath, str]:
    """Render every file of a new project in memory: relative path -> text."""
    base = (root if root is not None else templates_root()).joinpath(_PROJECT_TEMPLATE)
    if not base.is_dir():
        raise SettingsError(f"template tree has no {_PROJECT_TEMPLATE!r} directory")
    values = template_values(spec)
    files: dict[PurePosixPath, str] = {}
    for rel, node in _walk(base, PurePosixPath()):
        target = PurePosixPath(render(str(rel), values, source=f"template path {rel}"))
        if target.name.endswith(_TEMPLATE_SUFFIX):
            target = target.with_name(target.name[: -len(_TEMPLATE_SUFFIX)])
        files[target] = render(node.read_text(encoding="utf-8"), values, source=f"template {rel}")
    for os_name in spec.oses:
        text = json.dumps(job_definition(spec, os_name), indent=2) + "\n"
        files[job_file_name(spec, os_name)] = text
    return files


# --- writing --------------------------------------------------------------------------------


def resolve_target(directory: str | os.PathLike[str] | None, spec: ProjectSpec) -> Path:
    """Return the project directory for ``--dir`` (default ``./<job id>``).

    A relative ``--dir`` must stay inside the current directory: a name or a path handed over by
    a script cannot climb out with ``..``. Give an absolute path to write elsewhere.

    Raises:
        UsageError: The directory escapes the current directory.
    """
    cwd = Path.cwd().resolve()
    if directory is None:
        return cwd / spec.job_id
    raw = Path(directory)
    if raw.is_absolute():
        return Path(os.path.abspath(raw))
    target = Path(os.path.abspath(cwd / raw))
    if target != cwd and cwd not in target.parents:
        raise UsageError(
            f"--dir {str(directory)!r} leaves the current directory; pass an absolute path to "
            "create the project elsewhere"
        )
    return target


def _safe_destination(root: Path, rel: PurePosixPath) -> Path:
    """Return ``root/rel``, refusing ``..``, absolute parts and writes through symlinks."""
    if rel.is_absolute() or any(part in ("", ".", "..") for part in rel.parts):
        raise UsageError(f"refusing to write {str(rel)!r}: it would leave the project directory")
    dest = root.joinpath(*rel.parts)
    current = root
    for part in rel.parts:
        current = current / part
        if current.is_symlink():
            raise UsageError(f"refusing to write through the symlink {current}")
    if root.resolve() not in dest.resolve().parents:
        raise UsageError(f"refusing to write {dest}: it resolves outside {root}")
    return dest


def create_project(
    spec: ProjectSpec,
    target: Path,
    *,
    force: bool = False,
    templates: Traversable | None = None,
) -> list[Path]:
    """Write a new project into ``target`` and return the files written.

    All files are rendered before anything is written, so a template error leaves no half
    project behind. With ``force`` the generated files overwrite existing ones; other files in
    ``target`` are kept.

    Raises:
        UsageError: ``target`` is a file, a symlink, or a non-empty directory without ``force``.
    """
    if target.is_symlink():
        raise UsageError(f"{target} is a symlink; choose a real directory")
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise UsageError(f"{target} exists and is not empty; pass --force to overwrite its files")
    files = project_files(spec, templates)
    target.mkdir(parents=True, exist_ok=True)
    root = target.resolve()
    written: list[Path] = []
    for rel, text in files.items():
        dest = _safe_destination(root, rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # PowerShell scripts keep CRLF so that Windows tools show them as written.
        newline = "\r\n" if rel.suffix == ".ps1" else "\n"
        with dest.open("w", encoding="utf-8", newline=newline) as fh:
            fh.write(text)
        if rel.suffix == ".sh":
            mode = dest.stat().st_mode
            dest.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        written.append(dest)
    return written
