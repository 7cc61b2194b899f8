# Stub for the compiled cffi module: `Any` is confined to this file.
from typing import Any

ffi: Any
lib: Any
