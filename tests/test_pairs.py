"""Pair lists: LFW's pairs.txt as distributed, and path1,path2,same CSVs; errors name the file and line."""

from pathlib import Path

import numpy as np
import pytest

from conftest import evaluate_args, one_line_error
from mltk.errors import MltkError
from mltk.metrics import Pairs, evaluate_embeddings
from mltk.pairs import check_images, read_csv_pairs, read_lfw_pairs, read_pairs

# Two folds of two matched and two mismatched pairs, tab-separated like LFW's own file.
LFW = """2\t2
Abel_Pacheco\t1\t4
Akhmed_Zakayev\t1\t3
Abdel_Madi_Shabneh\t1\tDean_Barker\t1
Abdel_Madi_Shabneh\t1\tGiancarlo_Fisichella\t1
Abel_Pacheco\t2\t3
Tom_Ridge\t7\t12
Tom_Ridge\t7\tAbel_Pacheco\t1
Dean_Barker\t1\tAkhmed_Zakayev\t2
"""


def image(root, name, i):
    return root / name / f"{name}_{i:04d}.jpg"


def test_lfw_pairs_with_folds(tmp_path):
    (tmp_path / "pairs.txt").write_text(LFW)
    pairs = read_pairs(tmp_path / "pairs.txt", tmp_path / "lfw")
    root = tmp_path / "lfw"
    assert pairs.pairs[0] == (image(root, "Abel_Pacheco", 1), image(root, "Abel_Pacheco", 4), True)
    assert pairs.pairs[2] == (image(root, "Abdel_Madi_Shabneh", 1), image(root, "Dean_Barker", 1), False)
    assert pairs.pairs[5] == (image(root, "Tom_Ridge", 7), image(root, "Tom_Ridge", 12), True)
    assert [same for *_, same in pairs.pairs] == [True, True, False, False] * 2
    assert pairs.folds == [0, 0, 0, 0, 1, 1, 1, 1] and pairs.lines == list(range(2, 10))


def test_single_number_header_has_no_folds(tmp_path):
    (tmp_path / "pairsDevTrain.txt").write_text("2\n" + "\n".join(LFW.splitlines()[1:5]) + "\n")
    pairs = read_lfw_pairs(tmp_path / "pairsDevTrain.txt", tmp_path)
    assert len(pairs.pairs) == 4 and pairs.folds is None


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda lines: lines[:3] + ["Abel_Pacheco\t1"] + lines[4:], r"pairs.txt, line 4: expected 'name i j' or 'name1 i name2 j', got 'Abel_Pacheco\\t1'$"),
        (lambda lines: lines[:5] + ["Abel_Pacheco\tone\tDean_Barker\t1"] + lines[6:], r"pairs.txt, line 6: expected 'name i j'"),
        (lambda lines: ["10 300 7"] + lines[1:], r"pairs.txt, line 1: expected a header 'folds n' or 'n', got '10 300 7'"),
        (lambda lines: lines[:-1], r"pairs.txt: the header \(line 1\) announces 8 pairs, the file has 7"),
    ],
)
def test_malformed_lfw_file_names_the_line(tmp_path, change, message):
    (tmp_path / "pairs.txt").write_text("\n".join(change(LFW.splitlines())) + "\n")
    with pytest.raises(MltkError, match=message):
        read_pairs(tmp_path / "pairs.txt", tmp_path)


def test_csv_with_and_without_header(tmp_path):
    body = "a/1.jpg,b/1.jpg,1\na/2.jpg, b/2.jpg ,false\n\nc/1.jpg,c/2.jpg,TRUE\na/1.jpg,c/2.jpg,0\n"
    for name, text in (("with.csv", "path1,path2,same\n" + body), ("without.csv", body)):
        (tmp_path / name).write_text(text)
        pairs = read_pairs(tmp_path / name, tmp_path)
        assert [(p1.relative_to(tmp_path).as_posix(), p2.relative_to(tmp_path).as_posix(), s) for p1, p2, s in pairs.pairs] == [
            ("a/1.jpg", "b/1.jpg", True), ("a/2.jpg", "b/2.jpg", False), ("c/1.jpg", "c/2.jpg", True), ("a/1.jpg", "c/2.jpg", False),
        ]
        assert pairs.folds is None
    assert read_csv_pairs(tmp_path / "with.csv", tmp_path).lines == [2, 3, 5, 6]


def test_malformed_csv_line_is_named(tmp_path):
    (tmp_path / "pairs.csv").write_text("path1,path2,same\na.jpg,b.jpg,1\na.jpg,b.jpg,maybe\n")
    with pytest.raises(MltkError, match=r"pairs.csv, line 3: expected 'path1,path2,same' with same 1/0/true/false, got 'a.jpg,b.jpg,maybe'"):
        read_pairs(tmp_path / "pairs.csv", tmp_path)
    (tmp_path / "short.csv").write_text("a.jpg,b.jpg,1\na.jpg,1\n")
    with pytest.raises(MltkError, match="short.csv, line 2"):
        read_pairs(tmp_path / "short.csv", tmp_path)


def test_missing_images_are_named_with_their_line(tmp_path):
    (tmp_path / "pairs.txt").write_text(LFW)
    pairs = read_pairs(tmp_path / "pairs.txt", tmp_path / "lfw")
    for first, second, _ in pairs.pairs:
        for path in (first, second):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    check_images(pairs)
    image(tmp_path / "lfw", "Dean_Barker", 1).unlink()
    image(tmp_path / "lfw", "Tom_Ridge", 12).unlink()
    missing = image(tmp_path / "lfw", "Dean_Barker", 1)
    with pytest.raises(MltkError, match=rf"pairs.txt, line 4: image not found: {missing} \(1 more images missing\)"):
        check_images(pairs)


def test_missing_pair_list_is_an_error(tmp_path):
    with pytest.raises(MltkError, match="pair list not found"):
        read_pairs(tmp_path / "nope.txt", tmp_path)


def test_lfw_folds_reach_the_cross_validated_accuracy(tmp_path):
    (tmp_path / "pairs.txt").write_text(LFW)
    pairs = read_pairs(tmp_path / "pairs.txt", tmp_path)
    images, first, second = pairs.index()
    assert len(images) == len(set(images)) == 12 and images[first[5]] == pairs.pairs[5][0]
    same = np.array([s for *_, s in pairs.pairs])
    # Thresholds in (0.4, 0.6] separate fold 0, in (0.25, 0.3] fold 1; each misclassifies one pair of the other fold.
    scores = np.array([0.9, 0.6, 0.4, 0.1, 0.3, 0.8, 0.1, 0.25])
    values = evaluate_embeddings(None, pairs=Pairs(scores, same, np.array(pairs.folds)), metrics=["accuracy_10fold"]).values
    assert values["accuracy"] == 0.75 and values["accuracy_threshold"] == pytest.approx((0.6 + 0.3) / 2)
    dealt = evaluate_embeddings(None, pairs=Pairs(scores, same), metrics=["accuracy_10fold"]).values
    assert dealt["accuracy"] != values["accuracy"]


def test_paths_are_under_the_root(tmp_path):
    (tmp_path / "pairs.txt").write_text(LFW)
    pairs = read_pairs(tmp_path / "pairs.txt", Path("elsewhere"))
    assert pairs.pairs[0][0] == Path("elsewhere/Abel_Pacheco/Abel_Pacheco_0001.jpg")


# --- errors quote the line as it is, CSV reader errors, both kinds of pair


def test_lfw_error_quotes_the_line_as_it_is_in_the_file(tmp_path):
    from mltk.pairs import read_pairs

    (tmp_path / "pairs.txt").write_text("1\nAbel_Pacheco\t1\t4\n  Abel_Pacheco \t x \t4 \n")
    with pytest.raises(MltkError, match=r"pairs.txt, line 3: expected 'name i j' or 'name1 i name2 j', got '  Abel_Pacheco \\t x \\t4 '$"):
        read_pairs(tmp_path / "pairs.txt", tmp_path)
    (tmp_path / "header.txt").write_text("10\t300 7\n")
    with pytest.raises(MltkError, match=r"header.txt, line 1: expected a header 'folds n' or 'n', got '10\\t300 7'$"):
        read_pairs(tmp_path / "header.txt", tmp_path)


@pytest.mark.parametrize(
    "text, expected",
    [
        ('a.png,b.png,1\n"a.png,b.png,1\nc.png,d.png,0\ne.png,f.png,0\n', r"pairs.csv, line 2: a quote opens and is not closed on that line: '\"a.png,b.png,1'$"),
        ("a.png,b.png,1\na.png," + "x" * 200_000 + ",0\n", r"pairs.csv, line 2: not a readable CSV line \(field larger than field limit \(131072\)\): 'a.png,xxx+\.\.\.'$"),
        ("path1,path2,same\n a.png , b.png ,maybe\n", r"pairs.csv, line 2: expected 'path1,path2,same' with same 1/0/true/false, got ' a.png , b.png ,maybe'$"),
    ],
    ids=["unclosed quote", "field too large", "bad same"],
)
def test_csv_pair_list_errors_name_the_line_without_dumping_the_file(text, expected, tmp_path):
    from mltk.pairs import read_pairs

    (tmp_path / "pairs.csv").write_text(text)
    with pytest.raises(MltkError, match=expected) as raised:
        read_pairs(tmp_path / "pairs.csv", tmp_path)
    assert len(str(raised.value)) < 400 and "\n" not in str(raised.value)


def test_a_pair_list_that_is_not_text_names_the_line(tmp_path):
    from mltk.pairs import read_pairs

    (tmp_path / "pairs.csv").write_bytes(b"a.png,b.png,1\nc.png,\xff\xfe.png,0\n")
    with pytest.raises(MltkError, match=r"pairs.csv, line 2: not UTF-8 text; a pair list is a text file$"):
        read_pairs(tmp_path / "pairs.csv", tmp_path)


@pytest.mark.parametrize("same, kind, other", [("1", "matched", "mismatched"), ("0", "mismatched", "matched")])
def test_a_pair_list_of_one_kind_is_one_line_before_embedding(same, kind, other, trained_run, mltk_main, tmp_path, monkeypatch):
    run, folder = trained_run
    (tmp_path / "pairs.csv").write_text("".join(f"class_0{c}/0.png,class_0{c}/1.png,{same}\n" for c in range(4)))
    import mltk.evaluate

    monkeypatch.setattr(mltk.evaluate, "embed", lambda *a, **k: pytest.fail("embedded before the pair list was checked"))
    line = one_line_error(mltk_main(*evaluate_args(run, folder, tmp_path / "eval", "--pairs", tmp_path / "pairs.csv")), code=1)
    assert line.endswith(f"pairs.csv: every pair is {kind} (4); ROC-AUC, EER, TAR@FAR and accuracy need {other} pairs too")
    assert not (tmp_path / "eval").exists()


def test_a_pair_list_left_with_one_kind_by_unreadable_images_says_so(tmp_path):
    from mltk.pairs import read_pairs

    (tmp_path / "pairs.csv").write_text("a.png,b.png,1\nc.png,d.png,0\n")
    pairs = read_pairs(tmp_path / "pairs.csv", tmp_path)
    with pytest.raises(MltkError, match=r"pairs.csv: every pair left once the unreadable images are left out is matched \(1\); .* need mismatched pairs too"):
        pairs.without({tmp_path / "d.png"})
