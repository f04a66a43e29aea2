"""Adversarial input to the plugin registry, the CLI's own output and the data readers (issue 17).

Plugin names, descriptions and errors, CSV fields and image headers are untrusted: they must not
crash a command, inject rich markup or terminal escapes, reach files outside the data, or blow
up memory; a mistake on the command line is one ``error:`` line.
"""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO, TINY, make_image_folder, one_line_error, snapshot

import mltk
from mltk import registry
from mltk.errors import MltkError
from mltk.plugins import errors, pm

# ---------------------------------------------------------------------------------------------
# helpers (prefixed plugins_data_ so that a merged test file has no clashes)


@pytest.fixture
def plugins_data_plugin():
    """Register plugin objects for one test; unregister them and forget their errors afterwards."""
    added = []

    def add(obj, name):
        pm.register(obj, name=name)
        added.append(name)
        return obj

    yield add
    for name in added:
        if pm.has_plugin(name):
            pm.unregister(name=name)
        errors.pop(name, None)


def plugins_data_losses(*entries):
    """A plugin object whose register_losses registers each ``(name, factory, description)`` in turn."""

    class Plugin:
        @mltk.hookimpl
        def register_losses(self, register):
            for name, factory, description in entries:
                register(name, factory, description=description)

    return Plugin()


def plugins_data_builder(num_classes=1, embedding_size=1, **kwargs):
    return "built"


# ---------------------------------------------------------------------------------------------
# 1. names a plugin registers are checked one by one; its other entries stay usable


@pytest.mark.parametrize(
    "bad",
    [42, None, "", "two words", "0.5*ce", "a+b", "[red]x[/red]", "x\x1b[2J", "tab\tname", "9lives", "x" * 101],
    ids=["int", "None", "empty", "space", "star", "plus", "markup", "ansi", "tab", "digit-first", "too-long"],
)
def test_a_bad_plugin_name_is_refused_alone_and_mltk_plugins_still_works(plugins_data_plugin, mltk_main, bad):
    plugins_data_plugin(plugins_data_losses((bad, plugins_data_builder, ""), ("pd_good.loss-1", plugins_data_builder, "")), "pd_names")
    assert "pd_good.loss-1" in registry.list_losses()  # the entry after the bad one is kept
    assert registry.create_loss("pd_good.loss-1", num_classes=2, embedding_size=2) == "built"
    assert "refused" in errors["pd_names"] and errors["pd_names"].startswith("register_losses: loss name ")
    code, out, err = mltk_main("plugins", "--json")
    assert code == 0, err
    row = {r["name"]: r for r in json.loads(out)}["pd_names"]
    assert row["registers"] == {"losses": ["pd_good.loss-1"]} and "refused" in row["error"]
    code, out, err = mltk_main("plugins")
    assert code == 0 and "pd_names" in out and "refused" in out and "\x1b" not in out, err
    code, out, err = mltk_main("list", "losses", "pd_*")
    assert code == 0 and out.split() == ["name", "plugin", "description", "pd_good.loss-1", "pd_names"]
    assert "warning: plugin 'pd_names' failed: register_losses: loss name " in err and "\x1b" not in err


def test_every_name_the_registry_takes_can_be_written_in_a_loss_spec(plugins_data_plugin):
    from mltk.config import parse_loss_spec

    names = ["pd_a", "_pd", "pd.b-2", "pd_" + "x" * 90, "pdé"]
    plugins_data_plugin(plugins_data_losses(*[(n, plugins_data_builder, "") for n in names]), "pd_spec")
    assert set(names) <= set(registry.list_losses()) and "pd_spec" not in errors
    assert [n for _, n in parse_loss_spec("+".join(f"0.5*{n}" for n in names))] == names


def test_a_builder_that_is_not_callable_or_a_description_that_is_not_text_is_refused(plugins_data_plugin, mltk_main):
    plugins_data_plugin(plugins_data_losses(("pd_five", 5, ""), ("pd_desc", plugins_data_builder, ["a", "list"]), ("pd_fine", plugins_data_builder, "ok")), "pd_kinds")
    assert {"pd_five", "pd_desc"}.isdisjoint(registry.list_losses()) and "pd_fine" in registry.list_losses()
    assert "'pd_five' refused: its builder is a int" in errors["pd_kinds"] and "'pd_desc' refused: its description is a list" in errors["pd_kinds"]
    code, out, err = mltk_main("list", "losses", "pd_*")
    assert code == 0 and "pd_fine" in out, err


def test_plugin_text_is_shown_as_text_not_markup_or_escapes(plugins_data_plugin, mltk_main):
    class Loud:
        @mltk.hookimpl
        def register_datasets(self, register):
            register("pd_loud", plugins_data_builder, description="[red]x[/red]\x1b[2J\x07[/bold]")

        @mltk.hookimpl
        def register_miners(self, register):
            raise RuntimeError("[b]boom[/b]\x1b[31m[/nope]")

    plugins_data_plugin(Loud(), "[i]pd_loud[/i]")
    code, out, err = mltk_main("list", "datasets", "pd_*")
    assert code == 0, err
    assert "[red]x[/red]" in out and "[/bold]" in out and "[i]pd_loud[/i]" in out  # printed as written
    assert "\x1b" not in out + err and "\x07" not in out
    code, out, err = mltk_main("list", "miners", "hard")
    assert code == 0 and "warning: plugin '[i]pd_loud[/i]' failed: register_miners: RuntimeError: [b]boom[/b][/nope]\n" in err
    code, out, err = mltk_main("plugins")  # a stray closing tag used to raise rich's MarkupError
    assert code == 0, err
    assert "[b]boom[/b]" in out and "[i]pd_loud[/i]" in out and "\x1b" not in out


# ---------------------------------------------------------------------------------------------
# 2. MLTK_LOAD_PLUGINS naming a plugin that is not installed


def test_load_plugins_naming_an_uninstalled_plugin_is_reported(mltk_cli):
    env = {"MLTK_LOAD_PLUGINS": "pd_not_installed"}
    rows = {row["name"]: row for row in json.loads(mltk_cli("plugins", "--json", env=env).stdout)}
    assert rows["pd_not_installed"]["error"].startswith("not installed")
    listed = mltk_cli("list", "datasets", env=env)
    assert listed.returncode == 0 and "digits" in listed.stdout
    assert listed.stderr.startswith("warning: plugin 'pd_not_installed' failed: not installed")
    rows = json.loads(mltk_cli("plugins", "--json", env={"MLTK_LOAD_PLUGINS": ""}).stdout)  # '' asks for none: nothing is missing
    assert rows and all(row["error"] is None for row in rows)


# ---------------------------------------------------------------------------------------------
# 3. CSV lists: an open quote, paths outside the CSV's folder, bounded lines


def plugins_data_csv(folder: Path, body: str, name: str = "list.csv") -> Path:
    path = folder / name
    path.write_text("path,label\n" + body)
    return path


def test_an_unclosed_quote_names_its_line_and_not_the_file(image_folder):
    from mltk.data import load_data

    rows = "".join(f"class_00/{i % 4}.png,SECRET{i}\n" for i in range(200))
    csv_file = plugins_data_csv(image_folder, f'class_00/0.png,a\n"class_00/1.png,a\n{rows}')
    with pytest.raises(MltkError) as caught:
        load_data(str(csv_file))
    message = str(caught.value)
    assert "line 3: a quoted field runs on to line 203; is a closing quote missing?" in message
    assert "SECRET" not in message and len(message) < 200


def test_an_unclosed_quote_in_a_large_file_stops_at_csv_field_limit(image_folder):
    from mltk.data import load_data

    csv_file = plugins_data_csv(image_folder, '"class_00/1.png,a\n' + "class_00/0.png,SECRET\n" * 20000)
    with pytest.raises(MltkError, match=r"line 2: a quoted field runs on to line \d+; is a closing quote missing\?$") as caught:
        load_data(str(csv_file))
    assert "SECRET" not in str(caught.value)


@pytest.mark.parametrize("rel", ["../outside.png", "class_00/../../outside.png", "ABSOLUTE", ".."])
def test_csv_paths_must_stay_in_the_csv_folder(tmp_path, mltk_main, rel):
    from mltk.data import load_data

    folder = make_image_folder(tmp_path / "data", classes=2, per_class=2)
    (tmp_path / "outside.png").write_bytes((folder / "class_00" / "0.png").read_bytes())
    rel = str(tmp_path / "outside.png") if rel == "ABSOLUTE" else rel
    csv_file = plugins_data_csv(folder, f"class_00/0.png,a\nclass_01/0.png,b\n{rel},a\n")
    with pytest.raises(MltkError, match=r"line 4: the path '.*'(\.\.\.)? leaves the CSV's folder; paths are relative to it"):
        load_data(str(csv_file))
    before = snapshot(tmp_path)
    line = one_line_error(mltk_main("run", "--data", csv_file, "--out", tmp_path / "run", "--backbone", TINY["backbone"], "--epochs", "0"))
    assert "line 4: the path" in line and "leaves the CSV's folder" in line
    assert snapshot(tmp_path) == before


def test_a_link_inside_the_csv_folder_is_followed(tmp_path):
    from mltk.data import load_data

    folder = make_image_folder(tmp_path / "data", classes=2, per_class=2)
    elsewhere = make_image_folder(tmp_path / "elsewhere", classes=1, per_class=1)
    (folder / "linked").symlink_to(elsewhere / "class_00")
    data = load_data(str(plugins_data_csv(folder, "class_00/0.png,a\n./linked/0.png,b\n")))
    assert data.sources[1] == (elsewhere / "class_00" / "0.png").resolve()


@pytest.mark.parametrize(
    "body, message",
    [
        ("class_00/0.png,a\nclass_00/\x00.png,a\n", r"line 3: the path 'class_00/\\x00.png' holds control characters"),
        ("class_00/0.png,a\nclass_00/1.png,b\x1b[31m\n", r"line 3: the label 'b\\x1b\[31m' holds control characters"),
        ("class_00/0.png,a\n" + "x" * 70000 + ",a\n", r"line 3: longer than 65536 bytes; expected path,label lines"),
        ("class_00/0.png,a\n" + "y" * 300 + ".png,a\n", r"line 3: image 'y{60}'\.\.\. cannot be opened \(File name too long\)"),
        ("class_00/0.png,a\n" + "z" * 200 + ".png,a\n", r"line 3: image 'z{60}'\.\.\. does not exist$"),
    ],
    ids=["nul-in-path", "ansi-in-label", "huge-line", "name-too-long", "long-missing-name"],
)
def test_csv_fields_are_bounded_and_quoted_short(image_folder, body, message):
    from mltk.data import load_data

    with pytest.raises(MltkError, match=message) as caught:
        load_data(str(plugins_data_csv(image_folder, body)))
    assert len(str(caught.value)) < 300


def test_a_csv_header_and_bom_and_column_order(image_folder):
    from mltk.data import load_data

    (image_folder / "bom.csv").write_bytes("\ufefflabel,extra,path\nb,1,class_01/0.png\n\na,2,class_00/0.png\n".encode())
    data = load_data(str(image_folder / "bom.csv"))
    assert data.classes == ["a", "b"] and data.labels == [1, 0]
    (image_folder / "empty.csv").write_text("")
    with pytest.raises(MltkError, match="needs a header with the columns path,label"):
        load_data(str(image_folder / "empty.csv"))
    (image_folder / "binary.csv").write_bytes(b"path,label\nclass_00/0.png,a\n\xff\xfe,b\n")
    with pytest.raises(MltkError, match="line 3: not a readable CSV"):
        load_data(str(image_folder / "binary.csv"))


# ---------------------------------------------------------------------------------------------
# 4. images over PIL's pixel limit (a few KB on disk, gigabytes decoded)


@pytest.fixture(scope="module")
def plugins_data_bomb(tmp_path_factory):
    """A 1-bit PNG of 10,000 x 10,000 pixels: 12 KB on disk, over PIL's warning limit, under its error limit."""
    from PIL import Image

    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    Image.new("1", (10000, 10000)).save(path)
    assert path.stat().st_size < 100_000 and Image.MAX_IMAGE_PIXELS < 10000 * 10000 < 2 * Image.MAX_IMAGE_PIXELS
    return path


def test_an_image_over_pils_limit_is_skipped_by_the_scan_with_a_reason(plugins_data_bomb, image_folder):
    from PIL import Image

    from mltk.data import check_image, drop_unreadable, load_data

    reason = f"too large: 10000 x 10000 pixels, over PIL's limit of {Image.MAX_IMAGE_PIXELS}"
    assert check_image(plugins_data_bomb) == reason
    (image_folder / "class_02" / "huge.png").write_bytes(plugins_data_bomb.read_bytes())
    kept, skipped = drop_unreadable(load_data(str(image_folder)))
    assert skipped == [(image_folder / "class_02" / "huge.png", reason)] and len(kept) == 32


def test_open_image_refuses_a_huge_image_before_decoding_it(plugins_data_bomb, monkeypatch):
    from PIL import Image, ImageFile

    from mltk.data import open_image

    def no_decoding(self):
        raise AssertionError("the huge image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(Image.DecompressionBombError, match="too large: 10000 x 10000 pixels"):
        open_image(plugins_data_bomb, "RGB")


def test_an_image_over_twice_the_limit_has_the_same_reason(tmp_path, monkeypatch):
    from PIL import Image

    from mltk.data import check_image

    Image.new("L", (50, 50)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 2,500 pixels: PIL refuses it while opening
    assert check_image(tmp_path / "big.png") == "too large: 2500 pixels, over PIL's limit of 1000"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the limit turned off: mltk follows
    assert check_image(tmp_path / "big.png") is None


def test_pils_raw_warning_is_not_printed(plugins_data_bomb):
    code = (
        "import sys; from mltk.data import check_image, open_image\n"
        f"print(check_image({str(plugins_data_bomb)!r}))\n"
        "try:\n"
        f"    open_image({str(plugins_data_bomb)!r}, 'RGB')\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.splitlines()[1] == "DecompressionBombError"


# ---------------------------------------------------------------------------------------------
# 5. mistakes on the command line: one line, exit 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--dim", "abc"], "error: Invalid value for '--dim': "),
        (["evaluate", "--index", "bogus"], "error: Invalid value for '--index': "),
        (["list"], "error: Missing argument 'kind'. Choose from: backbones, losses, miners, metrics, datasets; see `mltk list --help`"),
        (["plugins", "--nope"], "error: No such option: --nope; see `mltk plugins --help`"),
        (["no-such-command"], "error: No such command 'no-such-command'; see `mltk --help`"),
        (["list", "losses", "a", "b"], "error: Got unexpected extra argument"),
    ],
    ids=["bad-int", "bad-choice", "missing-argument", "unknown-option", "unknown-command", "extra-argument"],
)
def test_command_line_mistakes_are_one_line(mltk_main, tmp_path, args, message):
    before = snapshot(tmp_path)
    line = one_line_error(mltk_main(*args), code=2)
    assert line.startswith(message), line
    assert snapshot(tmp_path) == before


def test_help_still_shows_help(mltk_main):
    code, out, err = mltk_main("--help")
    assert code == 0 and "Usage" in out and "plugins" in out and err == ""
    code, out, err = mltk_main("list", "--help")
    assert code == 0 and "fnmatch pattern" in out
    code, out, err = mltk_main()  # no arguments: the help, and a usage exit code
    assert code == 2 and "Usage" in out and "Commands" in out


def test_help_still_does_not_import_torch():
    code = "import sys; from mltk.cli import main; sys.argv = ['mltk', '--help']\ntry:\n    main()\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "False", result.stderr


# ---------------------------------------------------------------------------------------------
# 6. other text from files, folders and users that the CLI prints


def test_an_error_with_newlines_and_escapes_is_still_one_plain_line(mltk_main, monkeypatch):
    import typer

    import mltk.cli

    fake = typer.Typer(add_completion=False)

    @fake.command()
    def explode() -> None:
        raise MltkError("first line\nsecond \x1b[31mred\x1b[0m line\r")

    @fake.command()
    def other() -> None:
        pass

    monkeypatch.setattr(mltk.cli, "app", fake)
    line = one_line_error(mltk_main("explode"), code=1)
    assert line == "error: first line second red line"


def test_a_run_directory_with_markup_is_printed_as_it_is(capsys):
    from mltk.cli import render_summary

    result = SimpleNamespace(train_images=4, train_classes=2, val_images=0, history=[], best=None, run_dir=Path("runs/[red]x[/red]\x1b[2J"))
    render_summary(result)
    out = capsys.readouterr().out
    assert "runs/[red]x[/red]" in out and "\x1b" not in out


@pytest.mark.parametrize("pattern", ["[red]*", "[/red]", "*[/]*", "arc\x1b[2J*"])
def test_list_with_a_markup_pattern(mltk_main, plugins_data_plugin, pattern):
    plugins_data_plugin(plugins_data_losses(("pd_plain", plugins_data_builder, "[red]x[/red]")), "pd_pattern")
    code, out, err = mltk_main("list", "losses", pattern)
    assert code == 0 and err == "" and "\x1b" not in out
    code, out, err = mltk_main("list", "losses", "pd_plain")
    assert code == 0 and "[red]x[/red]" in out


def test_warnings_are_plain_one_liners(capsys):
    from mltk.cli import warn

    warn("class \x1b[31mred\x1b[0m\nnext [bold]x[/bold]")
    assert capsys.readouterr().err == "warning: class red next [bold]x[/bold]\n"
