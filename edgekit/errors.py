"""Errors that carry what went wrong (standard library only).

A user's mistake is an `EdgekitError` (the CLI prints its one line and exits 2).
A validation that misses its budget is `BudgetMissed` (exit 1, report written).
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class EdgekitError(Exception):
    """A problem the user can fix: what went wrong, where, and what to do."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class TargetError(EdgekitError):
    """A target profile that cannot be found or does not validate."""

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None,
                 hint: str | None = None):
        where = ""
        if path:
            where = f"{path}"
            if key:
                where += f": key '{key}'"
            where += ": "
        super().__init__(where + message, hint=hint)
        self.path = path
        self.key = key


class SourceModelError(EdgekitError):
    """The model given to convert cannot be read or is of a kind we do not take."""

    def __init__(self, message: str, *, path: str | None = None, hint: str | None = None):
        super().__init__(f"{path}: {message}" if path else message, hint=hint)
        self.path = path


class DataError(EdgekitError):
    """Calibration / validation / input data that does not fit the model."""

    def __init__(self, message: str, *, path: str | None = None, tensor: str | None = None,
                 hint: str | None = None):
        prefix = ""
        if path:
            prefix += f"{path}: "
        if tensor:
            prefix += f"input '{tensor}': "
        super().__init__(prefix + message, hint=hint)
        self.path = path
        self.tensor = tensor


class BundleError(EdgekitError):
    """A bundle that is missing, malformed, or fails verification."""

    def __init__(self, message: str, *, path: str | None = None, hint: str | None = None):
        super().__init__(f"{path}: {message}" if path else message, hint=hint)
        self.path = path


class BackendUnavailable(EdgekitError):
    """No installed inference backend can run the artifact."""

    def __init__(self, message: str, *, fmt: str | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.fmt = fmt


class ConversionError(EdgekitError):
    """The converter could not produce an artifact (names the target and stage)."""

    def __init__(self, message: str, *, target: str | None = None, stage: str | None = None,
                 hint: str | None = None):
        prefix = ""
        if target:
            prefix += f"target {target}: "
        if stage:
            prefix += f"{stage}: "
        super().__init__(prefix + message, hint=hint)
        self.target = target
        self.stage = stage


class RecipeError(EdgekitError):
    """A conversion recipe that does not validate: names the field (and the file it came from)."""

    def __init__(self, message: str, *, field: str | None = None, path: str | None = None,
                 hint: str | None = None):
        super().__init__(f"{path}: {message}" if path else message, hint=hint)
        self.field = field
        self.path = path


class BudgetMissed(EdgekitError):
    """Some artifacts missed the fidelity floor or failed to convert; the others and the report
    were written. `result` is the whole ConvertResult (rows, reasons, report path)."""

    exit_code = 1

    def __init__(self, message: str, *, result=None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.result = result


class DeviceError(EdgekitError):
    """Something about one device: unreachable, refused, missing runtime, out of space.

    In a fleet run this is data (a failed result for that device), not a crash.
    """

    def __init__(self, message: str, *, device: str | None = None, host: str | None = None,
                 hint: str | None = None):
        where = f"device {device}" if device else ""
        if host:
            where += f" ({host})" if where else host
        super().__init__(f"{where}: {message}" if where else message, hint=hint)
        self.device = device
        self.host = host


class HostKeyError(DeviceError):
    """An unknown host key (refused unless trusted) or a changed one (always refused)."""

    def __init__(self, message: str, *, device: str | None = None, host: str | None = None,
                 fingerprint: str | None = None, expected: str | None = None,
                 hint: str | None = None):
        super().__init__(message, device=device, host=host, hint=hint)
        self.fingerprint = fingerprint
        self.expected = expected


class InventoryError(EdgekitError):
    """devices.toml that cannot be read, or a device/group that is not in it."""
