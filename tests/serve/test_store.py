"""`url` images: served until they expire, then deleted from disk; the oldest go first past the cap."""

from __future__ import annotations

from t2i.serve.store import ImageStore


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_images_expire_and_their_files_are_deleted(tmp_path):
    clock = Clock()
    store = ImageStore(ttl_s=10, max_items=100, clock=clock, root=tmp_path)
    first = store.put(b"png-1")
    clock.now = 6
    second = store.put(b"png-2")
    assert store.get(first) == b"png-1" and store.get(second) == b"png-2"
    assert len(list(store.root.iterdir())) == 2
    clock.now = 11
    assert store.get(first) is None and store.get(second) == b"png-2"
    assert [p.name for p in store.root.iterdir()] == [f"{second}.png"]
    clock.now = 17
    assert store.sweep() == 1 and len(store) == 0 and not list(store.root.iterdir())
    store.close()
    assert not store.root.exists()


def test_at_most_max_items_are_kept_oldest_first(tmp_path):
    store = ImageStore(ttl_s=100, max_items=3, root=tmp_path)
    tokens = [store.put(bytes([i])) for i in range(5)]
    assert [store.get(t) for t in tokens] == [None, None, b"\x02", b"\x03", b"\x04"]
    assert len(list(store.root.iterdir())) == 3
    store.close()


def test_tokens_are_random_and_name_nothing_else(tmp_path):
    store = ImageStore(ttl_s=100, max_items=10, root=tmp_path)
    (tmp_path / "secret.png").write_bytes(b"secret")
    tokens = {store.put(b"x") for _ in range(5)}
    assert len(tokens) == 5 and all(len(t) >= 22 for t in tokens)  # 128 random bits, url-safe base64
    for name in ("secret", "../secret", str(tmp_path / "secret"), ""):
        assert store.get(name) is None
    store.close()
