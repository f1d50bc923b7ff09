"""Exports and the state database: validation, xNBD's file format, atomic saves, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from xnbdd.wrapper.registry import (
    Database,
    DatabaseError,
    ExportEntry,
    Registry,
    RegistryError,
    load_config_dir,
    restore,
)


def image(tmp_path: Path, name: str = "disk.img", size: int = 1 << 20) -> str:
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def proxy(tmp_path: Path, name: str = "vm7") -> ExportEntry:
    return ExportEntry(
        name=name,
        mode="proxy",
        image=image(tmp_path, f"{name}.cache"),
        bitmap=str(tmp_path / f"{name}.bitmap"),
        control_socket=str(tmp_path / f"{name}.ctl"),
        remote_host="127.0.0.1",
        remote_port="8520",
    )


def test_database_has_the_originals_format(tmp_path: Path) -> None:
    db = Database(str(tmp_path / "state" / "xnbd.state"))
    registry = Registry(db)
    registry.add(ExportEntry(name="disk1", mode="target", image=image(tmp_path)))
    registry.add(proxy(tmp_path))
    text = Path(db.path).read_text()
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=4) + "\n"
    data = json.loads(text)
    assert data["version"] == 2
    assert data["images"]["disk1"] == {"image_path": image(tmp_path), "mode": "target"}
    vm7 = data["images"]["vm7"]
    assert vm7["remote_port"] == "8520" and vm7["remote_export_name"] is None
    assert vm7["mode"] == "proxy" and vm7["control_socket_path"].endswith("vm7.ctl")
    assert os.stat(db.path).st_mode & 0o777 == 0o600
    assert os.stat(os.path.dirname(db.path)).st_mode & 0o777 == 0o700
    assert sorted(os.listdir(os.path.dirname(db.path))) == ["xnbd.state"], "no temp files left"
    assert [e.name for e in db.load()] == ["disk1", "vm7"]
    assert db.load()[1] == proxy(tmp_path)


def test_configuration_exports_are_not_state(tmp_path: Path) -> None:
    db = Database(str(tmp_path / "xnbd.state"))
    registry = Registry(db)
    registry.add(ExportEntry(name="cfg", mode="target", image=image(tmp_path), persistent=False))
    registry.add(ExportEntry(name="rt", mode="target", image=image(tmp_path)))
    assert [e.name for e in db.load()] == ["rt"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"version": 1, "images": {}}', "not a version 2"),
        (b'{"version": 2, "images": []}', "not an object"),
        (b'{"version": 2, "images": {"a": {"mode": "target"}}}', "'image_path' missing"),
        (b'{"version": 2, "images": {"a": {"mode": "cow", "image_path": "/x"}}}', "unknown mode"),
        (
            b'{"version": 2, "images": {"a": {"mode": "proxy", "image_path": "/x", '
            b'"bitmap_path": "/b", "control_socket_path": "/c", "remote_host": "h", '
            b'"remote_port": 8520}}}',
            "'remote_port' missing or not a string",
        ),
    ],
)
def test_corrupt_database_is_refused_and_left_alone(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "xnbd.state"
    path.write_bytes(content)
    with pytest.raises(DatabaseError, match=message):
        Database(str(path)).load()
    assert path.read_bytes() == content


def test_symlinked_or_hardlinked_database_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.state"
    real.write_text('{"version": 2, "images": {}}')
    link = tmp_path / "link.state"
    link.symlink_to(real)
    with pytest.raises(DatabaseError, match="not a regular file"):
        Database(str(link)).load()
    with pytest.raises(RegistryError, match="not a regular file"):
        Registry(Database(str(link))).add(
            ExportEntry(name="a", mode="target", image=image(tmp_path))
        )
    assert link.is_symlink() and real.read_text() == '{"version": 2, "images": {}}'
    hard = tmp_path / "hard.state"
    os.link(real, hard)
    with pytest.raises(DatabaseError, match="hard links"):
        Database(str(hard)).load()


def test_failed_save_changes_nothing(tmp_path: Path) -> None:
    db_path = tmp_path / "xnbd.state"
    registry = Registry(Database(str(db_path)))
    registry.add(ExportEntry(name="a", mode="target", image=image(tmp_path)))
    before = db_path.read_text()
    db_path.unlink()
    db_path.symlink_to(tmp_path / "elsewhere")  # now every save must refuse
    with pytest.raises(RegistryError):
        registry.add(ExportEntry(name="b", mode="target", image=image(tmp_path, "b.img")))
    with pytest.raises(RegistryError):
        registry.remove("a")
    assert registry.names() == ["a"]
    db_path.unlink()
    registry.save()
    assert db_path.read_text() == before


@pytest.mark.parametrize(
    ("name", "message"),
    [("", "must not be empty"), ("a\nb", "control characters"), ("x" * 4097, "longer than")],
)
def test_bad_names(tmp_path: Path, name: str, message: str) -> None:
    registry = Registry(None)
    with pytest.raises(RegistryError, match=message):
        registry.add(ExportEntry(name=name, mode="target", image=image(tmp_path)))
    assert len(registry) == 0


def test_names_that_look_like_paths_are_only_names(tmp_path: Path) -> None:
    registry = Registry(None)
    registry.add(ExportEntry(name="../../etc/passwd", mode="target", image=image(tmp_path)))
    registry.add(ExportEntry(name=image(tmp_path), mode="target", image=image(tmp_path)))
    assert registry.names() == ["../../etc/passwd", image(tmp_path)]


def test_duplicates_missing_and_relative_images(tmp_path: Path) -> None:
    registry = Registry(None)
    index = registry.add(ExportEntry(name="a", mode="target", image=image(tmp_path)))
    with pytest.raises(RegistryError, match="already exists"):
        registry.add(ExportEntry(name="a", mode="target", image=image(tmp_path, "other.img")))
    with pytest.raises(RegistryError, match="No such file"):
        registry.add(ExportEntry(name="b", mode="target", image=str(tmp_path / "missing")))
    with pytest.raises(RegistryError, match="must be absolute"):
        registry.add(ExportEntry(name="c", mode="target", image="disk.img"))
    with pytest.raises(RegistryError, match="not a regular file or block device"):
        registry.add(ExportEntry(name="d", mode="target", image=str(tmp_path)))
    p = proxy(tmp_path)
    registry.add(p)
    with pytest.raises(RegistryError, match="already used by proxy export 'vm7'"):
        registry.add(ExportEntry(**{**p.__dict__, "name": "vm8"}))
    assert registry.names() == ["a", "vm7"]
    assert registry.find_by_index(index) == "a"


def test_paths_must_stay_inside_the_allowed_directories(tmp_path: Path) -> None:
    allowed = tmp_path / "images"
    allowed.mkdir()
    inside = image(allowed, "ok.img")
    outside = image(tmp_path, "secret.img")
    (allowed / "escape.img").symlink_to(outside)
    registry = Registry(None, allowed_dirs=[str(allowed)])
    registry.add(ExportEntry(name="ok", mode="target", image=inside))
    for path in (outside, f"{allowed}/../secret.img", str(allowed / "escape.img")):
        with pytest.raises(RegistryError, match="outside the allowed directories"):
            registry.add(ExportEntry(name="bad", mode="target", image=path))
    assert registry.names() == ["ok"]


def test_restore_skips_bad_entries_and_keeps_the_previous_file(tmp_path: Path) -> None:
    db_path = tmp_path / "xnbd.state"
    good = image(tmp_path)
    original = json.dumps(
        {
            "version": 2,
            "images": {
                "good": {"mode": "target", "image_path": good},
                "gone": {"mode": "target", "image_path": str(tmp_path / "gone.img")},
            },
        }
    )
    db_path.write_text(original)
    db = Database(str(db_path))
    registry = Registry(db)
    warnings = restore(registry, db.load(), cow=True, readonly=False)
    assert any("'gone' skipped" in w for w in warnings)
    assert (tmp_path / "xnbd.state.prev").read_text() == original, "nothing lost"
    assert [e.name for e in db.load()] == ["good"]
    assert registry.get("good") == ExportEntry(name="good", mode="target", image=good, cow=True)
    assert registry.get("good").server_mode == "cow_target"  # type: ignore[union-attr]


def test_restore_of_a_clean_database_leaves_it_alone(tmp_path: Path) -> None:
    db_path = tmp_path / "xnbd.state"
    db = Database(str(db_path))
    Registry(db).add(ExportEntry(name="good", mode="target", image=image(tmp_path)))
    registry = Registry(db)
    assert restore(registry, db.load(), cow=False, readonly=True) == []
    assert not (tmp_path / "xnbd.state.prev").exists()
    assert registry.get("good").readonly  # type: ignore[union-attr]


def test_config_dir(tmp_path: Path) -> None:
    conf = tmp_path / "conf.d"
    conf.mkdir()
    img = image(tmp_path)
    (conf / "disk.conf").write_text(f"mode = cow-target\nimage = {img}\ndescription = a disk\n")
    (conf / "named.conf").write_text(
        f"image = {img}\nexportname = other\nreadonly = yes\nlport = 1234\n"
    )
    (conf / "ignored.txt").write_text("not a config\n")
    entries, warnings = load_config_dir(str(conf))
    assert [(e.name, e.server_mode, e.readonly, e.description) for e in entries] == [
        ("disk", "cow_target", False, "a disk"),
        ("other", "target", True, ""),
    ]
    assert all(not e.persistent for e in entries)
    assert warnings and "lport" in warnings[0]
    (conf / "bad.conf").write_text("colour = blue\n")
    with pytest.raises(RegistryError, match=r"bad\.conf"):
        load_config_dir(str(conf))
