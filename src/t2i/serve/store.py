"""Images answered as `url`: PNG files in a private temporary folder, served for `ttl_s` seconds, then deleted.

A file's name is a random 128-bit token made here; lookups go through the token -> path table, so a URL can
name only a file this store wrote (no path is ever built from user input). At most `max_items` files are kept:
the oldest go first when more arrive.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path


class ImageStore:
    def __init__(
        self, ttl_s: float, max_items: int, clock: Callable[[], float] = time.monotonic, root: Path | None = None
    ) -> None:
        self.ttl_s, self.max_items, self.clock = float(ttl_s), int(max_items), clock
        self.root = Path(tempfile.mkdtemp(prefix="t2i-serve-", dir=root))
        self._items: OrderedDict[str, tuple[Path, float]] = OrderedDict()  # token -> (file, expiry), oldest first
        self._lock = threading.Lock()

    def put(self, png: bytes) -> str:
        """Store PNG bytes; returns the token of its URL (`<token>.png`)."""
        token = secrets.token_urlsafe(16)
        path = self.root / f"{token}.png"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(png)
        tmp.replace(path)
        with self._lock:
            self._items[token] = (path, self.clock() + self.ttl_s)
            while len(self._items) > self.max_items:
                _, (old, _) = self._items.popitem(last=False)
                old.unlink(missing_ok=True)
        self.sweep()
        return token

    def get(self, token: str) -> bytes | None:
        """The PNG of `token` while it has not expired, else None."""
        self.sweep()
        with self._lock:
            item = self._items.get(token)
        if item is None:
            return None
        try:
            return item[0].read_bytes()
        except FileNotFoundError:
            return None

    def sweep(self) -> int:
        """Delete expired files; returns how many."""
        now, expired = self.clock(), []
        with self._lock:
            while self._items:
                _, (path, expiry) = next(iter(self._items.items()))
                if expiry > now:
                    break
                self._items.popitem(last=False)
                expired.append(path)
        for path in expired:
            path.unlink(missing_ok=True)
        return len(expired)

    def __len__(self) -> int:
        return len(self._items)

    def close(self) -> None:
        with self._lock:
            self._items.clear()
        shutil.rmtree(self.root, ignore_errors=True)
