import shutil

import numpy as np
import pytest
from PIL import Image

from embedcache.config import DatasetConfig
from embedcache.datasets import DATASETS, build_dataset
from embedcache.errors import DatasetError


def _make_domainbed(root, domains=("art", "photo"), classes=("cat", "dog"), n=3):
    for d in domains:
        for c in classes:
            (root / d / c).mkdir(parents=True)
            for k in range(n):
                Image.fromarray(np.full((20, 30, 3), 10 * k + len(c), np.uint8)).save(root / d / c / f"{k}.png")
    return root


def test_domainbed_layout(tmp_path):
    ds = build_dataset(DatasetConfig(name="domainbed", path=str(_make_domainbed(tmp_path / "db"))))
    assert len(ds) == 12 and ds.classes == ["cat", "dog"] and ds.domains == ["art", "photo"]
    df = ds.frame()
    assert list(df.columns) == ["index", "path", "class_name", "label", "domain", "split"]
    assert df.loc[df.class_name == "dog", "label"].eq(1).all()
    assert ds.load(0).size == (30, 20)


def test_hidden_folders_are_not_classes_and_a_class_missing_from_a_domain_is_said(tmp_path):
    """A .ipynb_checkpoints folder became a class ("a photo of a .ipynb checkpoints."), and a class
    folder misspelt in one domain made a class of its own while its class lacked that domain, with no
    word; images of a type not read (HEIC) were left out uncounted (a trial)."""
    root = _make_domainbed(tmp_path / "db", domains=("art", "photo", "sketch"))
    (root / "sketch" / "dog").rename(root / "sketch" / "dgo")
    for hidden in (root / "art" / ".ipynb_checkpoints", root / "art" / "cat" / ".ipynb_checkpoints"):
        hidden.mkdir()
        Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(hidden / "0.png")
    (root / "art" / "cat" / "notes.txt").write_text("not an image")
    (root / "art" / "cat" / "photo.heic").write_bytes(b"\0" * 10)
    with pytest.warns(UserWarning) as said:
        ds = build_dataset(DatasetConfig(name="domainbed", path=str(root)))
    assert ds.classes == ["cat", "dgo", "dog"] and len(ds) == 18  # no hidden folder's image, as a class or in one
    lines = [str(w.message) for w in said]
    assert any("class 'dgo' is only in domain sketch" in ln and "'dog' is not in sketch" in ln for ln in lines), lines
    assert any("1 image file of a type not read left out (photo.heic)" in ln for ln in lines), lines  # not notes.txt
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a dataset with every class in every domain: nothing said
        build_dataset(DatasetConfig(name="domainbed", path=str(_make_domainbed(tmp_path / "ok"))))


def test_fingerprint_ignores_location_but_not_labels(tmp_path):
    a = _make_domainbed(tmp_path / "a")
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)
    fa = build_dataset(DatasetConfig(name="domainbed", path=str(a))).fingerprint()
    assert fa == build_dataset(DatasetConfig(name="domainbed", path=str(b))).fingerprint()
    (b / "art" / "cat" / "0.png").rename(b / "art" / "dog" / "9.png")  # a relabelled image
    assert fa != build_dataset(DatasetConfig(name="domainbed", path=str(b))).fingerprint()


def test_folder_and_csv(tmp_path):
    root = _make_domainbed(tmp_path / "db", domains=("only",))
    flat = build_dataset(DatasetConfig(name="folder", path=str(root / "only")))
    assert len(flat) == 6 and flat.domains == ["only"]
    csv = tmp_path / "db" / "list.csv"
    csv.write_text("path,label,domain,split\nonly/cat/0.png,cat,d1,train\nonly/dog/1.png,dog,d2,val\n")
    ds = build_dataset(DatasetConfig(name="csv", path=str(csv)))
    assert [s.split for s in ds.samples] == ["train", "val"] and ds.domains == ["d1", "d2"]
    assert np.asarray(ds.load(1)).shape == (20, 30, 3)


def test_max_per_class(tmp_path):
    ds = build_dataset(DatasetConfig(name="domainbed", path=str(_make_domainbed(tmp_path / "db")), max_per_class=1))
    assert len(ds) == 4


@pytest.mark.parametrize("name", ["domainbed", "folder"])
def test_missing_or_empty_folder_is_a_clear_error(tmp_path, name):
    with pytest.raises(DatasetError, match="does not exist .*--set dataset.path="):
        build_dataset(DatasetConfig(name=name, path=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no images"):
        build_dataset(DatasetConfig(name=name, path=str(tmp_path / "empty")))


def test_a_domainbed_path_a_level_off_is_refused_with_the_right_path(tmp_path):
    """dataset.path one level too high (datasets/ above pacs/) made a store whose classes were the
    domains and whose one domain was "pacs", without a word; one level too low said "holds no images"
    of a folder full of them."""
    root = _make_domainbed(tmp_path / "datasets" / "pacs")
    with pytest.raises(DatasetError, match=r"one level deeper than domain/class/image .*dataset.path=.*datasets/pacs\b"):
        build_dataset(DatasetConfig(name="domainbed", path=str(tmp_path / "datasets")))
    with pytest.raises(DatasetError, match=r"holds class folders of images .*dataset.path=.*datasets/pacs\b.*dataset.name=folder"):
        build_dataset(DatasetConfig(name="domainbed", path=str(root / "art")))
    with pytest.raises(DatasetError, match=r"domain/class/image .*dataset.name=domainbed"):
        build_dataset(DatasetConfig(name="folder", path=str(root)))
    (root / "art" / "cat" / "more").mkdir()  # a class folder with a subfolder of its own: still a class
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "art" / "cat" / "more" / "x.png")
    assert len(build_dataset(DatasetConfig(name="domainbed", path=str(root)))) == 13


def test_a_folder_dataset_whose_classes_keep_images_in_a_subfolder_is_accepted(tmp_path):
    """Tiny-ImageNet's train/ layout: class/images/x.JPEG was refused as
    'domain/class/image' by a check that took any nesting for domain folders."""
    from PIL import Image
    from embedcache.config import DatasetConfig
    from embedcache.datasets import build_dataset

    for cls in ("n01443537", "n01629819"):
        d = tmp_path / "train" / cls / "images"
        d.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / f"{cls}_{i}.JPEG")
        (tmp_path / "train" / cls / f"{cls}_boxes.txt").write_text("")
    ds = build_dataset(DatasetConfig(name="folder", path=str(tmp_path / "train")))
    assert ds.classes == ["n01443537", "n01629819"] and len(ds) == 4


def test_csv_split_names_are_checked(tmp_path):
    (tmp_path / "x.csv").write_text("path,label,split\na.png,cat,train\nb.png,dog,holdout\n")
    with pytest.raises(DatasetError, match=r"x.csv row 3: split 'holdout'; use train, val or test"):
        build_dataset(DatasetConfig(name="csv", path=str(tmp_path / "x.csv")))


@pytest.mark.parametrize("rows,said", [("a.png,cat\n1.jpg\n", "row 3: no label"), ("a.png,cat\n2.jpg,\n", "row 3: no label"),
                                       (",cat\n", "row 2: no path"), ("a.png,cat,extra\n", "row 2: 1 field\\(s\\) more")])
def test_csv_rows_short_of_a_field_are_refused_by_row(tmp_path, rows, said):
    """A short row became class "None", an empty label class "", an extra column was dropped, and a
    row without its path was a traceback. A trailing comma (an empty extra field) is fine."""
    (tmp_path / "x.csv").write_text("path,label\n" + rows)
    with pytest.raises(DatasetError, match=f"x.csv {said}.*give every row its path,label"):
        build_dataset(DatasetConfig(name="csv", path=str(tmp_path / "x.csv")))
    (tmp_path / "y.csv").write_text("path,label\na.png,cat,\nb.png,dog\n")
    assert build_dataset(DatasetConfig(name="csv", path=str(tmp_path / "y.csv"))).classes == ["cat", "dog"]


@pytest.mark.parametrize("a,b", [("hot_dog", "hot dog"), ("Cat", "cat"), ("cat ", "cat"), ("sea  lion", "sea_lion")])
def test_classes_that_give_one_prompt_are_refused(tmp_path, a, b):
    """Two labels whose prompts the teacher reads alike (underscores shown as spaces; case and runs of
    spaces lost in its tokenizer) got identical text embeddings: the later class could never be
    predicted and scored 0 with exit 0."""
    (tmp_path / "x.csv").write_text(f"path,label\na.png,{a}\nb.png,{b}\nc.png,dog\n")
    first, later = sorted([a, b])  # classes are sorted
    with pytest.raises(DatasetError, match=f"classes '{first}' and '{later}' give the same prompt text.*rename one") as err:
        build_dataset(DatasetConfig(name="csv", path=str(tmp_path / "x.csv")))
    assert "\n" not in str(err.value)
    (tmp_path / "y.csv").write_text(f"path,label\na.png,{a}\nb.png,dog\nc.png,hotdog\n")
    assert len(build_dataset(DatasetConfig(name="csv", path=str(tmp_path / "y.csv"))).classes) == 3


@pytest.mark.parametrize("again", ["img/a.png,cat,test", "./img/a.png,cat,train", "img/../img/a.png,dog,train"])
def test_an_image_csv_lists_twice_is_refused_naming_both_rows(tmp_path, again):
    """A test row repeating a train row's image was trained on and scored (held-out accuracy inflated with
    exit 0); one listed under two labels was both classes."""
    (tmp_path / "x.csv").write_text(f"path,label,split\nimg/a.png,cat,train\nimg/b.png,dog,train\n{again}\n")
    with pytest.raises(DatasetError, match=r"x.csv rows 2 and 4 both list .*a.png; list each image once"):
        build_dataset(DatasetConfig(name="csv", path=str(tmp_path / "x.csv")))


def test_a_csv_row_without_the_domain_others_have_is_refused(tmp_path):
    """A blank domain cell became a domain named after the file, of one image, counted in every avg and held
    out by a lodo sweep (a trial). A column left wholly blank is no column: one domain, the file's name."""
    (tmp_path / "x.csv").write_text("path,label,domain\na.png,cat,art\nb.png,dog,art\nc.png,cat,\nd.png,dog,photo\n")
    with pytest.raises(DatasetError, match=r"x.csv row 4: no domain, where other rows have one \(1 such row\(s\)\); "
                                           r"give every row its domain"):
        build_dataset(DatasetConfig(name="csv", path=str(tmp_path / "x.csv")))
    (tmp_path / "y.csv").write_text("path,label,domain\na.png,cat,\nb.png,dog,\n")
    assert build_dataset(DatasetConfig(name="csv", path=str(tmp_path / "y.csv"))).domains == ["y"]


def test_a_domain_name_ending_with_a_space_is_refused_saying_so(tmp_path):
    """'photo ' was refused saying a domain name "begins with ... no space" (a trial: which rule?)."""
    (tmp_path / "x.csv").write_text("path,label,domain\na.png,cat,photo \nb.png,dog,art\n")
    with pytest.raises(DatasetError, match=r"domain 'photo ' cannot be told apart .* neither begins nor ends with a space"):
        build_dataset(DatasetConfig(name="csv", path=str(tmp_path / "x.csv")))


def test_csv_missing_columns(tmp_path):
    (tmp_path / "x.csv").write_text("file,cls\na.png,cat\n")
    with pytest.raises(DatasetError, match="needs a header with path,label"):
        build_dataset(DatasetConfig(name="csv", path=str(tmp_path / "x.csv")))


def test_unknown_dataset_lists_registry():
    with pytest.raises(KeyError, match="unknown dataset 'imagenet'; available: csv, domainbed, folder, synthetic"):
        build_dataset(DatasetConfig(name="imagenet"))


def test_synthetic_is_seeded():
    a = build_dataset(DatasetConfig(name="synthetic", seed=1))
    b = build_dataset(DatasetConfig(name="synthetic", seed=1))
    c = build_dataset(DatasetConfig(name="synthetic", seed=2))
    assert np.array_equal(np.asarray(a.load(5)), np.asarray(b.load(5)))
    assert not np.array_equal(np.asarray(a.load(5)), np.asarray(c.load(5)))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert len(a.domains) == 3 and len(a.classes) == 4
    assert set(DATASETS.names()) >= {"synthetic", "csv", "folder", "domainbed"}


def test_csv_text_encodings(tmp_path):
    """A spreadsheet's UTF-8 byte-order mark is no part of the first column's name, and a CSV in
    another encoding is one line (a UnicodeDecodeError traceback before)."""
    (tmp_path / "bom.csv").write_bytes("path,label\na.png,caf\u00e9\n".encode("utf-8-sig"))
    ds = build_dataset(DatasetConfig(name="csv", path=str(tmp_path / "bom.csv")))
    assert ds.classes == ["caf\u00e9"]
    (tmp_path / "latin.csv").write_bytes("path,label\na.png,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"latin.csv is not UTF-8 text \(byte \d+\); save it as UTF-8"):
        build_dataset(DatasetConfig(name="csv", path=str(tmp_path / "latin.csv")))


def _numbered_csv(tmp_path, labels=("2", "10", "1")):
    """A CSV whose labels are numbers (as many datasets ship them), one image per label."""
    for k in range(len(labels)):
        Image.fromarray(np.full((8, 8, 3), k, np.uint8)).save(tmp_path / f"{k}.png")
    rows = "".join(f"{k}.png,{lab}\n" for k, lab in enumerate(labels))
    (tmp_path / "x.csv").write_text("path,label\n" + rows)
    return str(tmp_path / "x.csv")


def test_class_names_name_the_labels_whose_order_gives_the_indices(tmp_path):
    """Numeric labels and WordNet ids name nothing to the teacher's text encoder: a class-names file
    replaces them by names. The indices follow the labels, by number when they are numbers (1, 2, 10;
    not the text order 1, 10, 2), whatever the order of the file's lines."""
    csv_path = _numbered_csv(tmp_path)
    names = tmp_path / "names.csv"
    names.write_text("label,name\n10,tiger shark\n3,great white shark\n1,tench\n2,goldfish\n")
    ds = build_dataset(DatasetConfig(name="csv", path=csv_path, class_names=str(names)))
    assert ds.classes == ["tench", "goldfish", "tiger shark"]  # label 3 has no image: no class
    assert [ds.label(i) for i in range(3)] == [1, 2, 0]
    assert list(ds.frame().class_name) == ["goldfish", "tiger shark", "tench"]
    (tmp_path / "names.json").write_text('{"1": "tench", "2": "goldfish", "10": "tiger shark"}')
    by_json = build_dataset(DatasetConfig(name="csv", path=csv_path, class_names=str(tmp_path / "names.json")))
    assert by_json.classes == ds.classes and by_json.fingerprint() == ds.fingerprint()
    # the order is part of what the store holds: classes out of name order are another dataset than sorted ones
    (tmp_path / "sorted.csv").write_text("label,name\n1,a tench\n2,b goldfish\n10,c tiger shark\n")
    in_order = build_dataset(DatasetConfig(name="csv", path=csv_path, class_names=str(tmp_path / "sorted.csv")))
    assert in_order.classes == ["a tench", "b goldfish", "c tiger shark"]
    plain = build_dataset(DatasetConfig(name="csv", path=csv_path))
    assert plain.classes == ["1", "10", "2"] and plain.fingerprint() != ds.fingerprint()
    # WordNet ids keep their text order (ImageNet's class indices)
    (tmp_path / "w.csv").write_text("path,label\n0.png,n02\n1.png,n10\n2.png,n01\n")
    (tmp_path / "wn.csv").write_text("label,name\nn10,zebra\nn01,tench\nn02,goldfish\n")
    wn = build_dataset(DatasetConfig(name="csv", path=str(tmp_path / "w.csv"), class_names=str(tmp_path / "wn.csv")))
    assert wn.classes == ["tench", "goldfish", "zebra"]
    # 1 and 01, one id twice: two classes, and every later id one index up from its value (a trial)
    (tmp_path / "z.csv").write_text("path,label\n0.png,0\n1.png,1\n2.png,01\n3.png,2\n")
    (tmp_path / "zn.csv").write_text("label,name\n0,horse\n1,cat\n01,dog\n2,bird\n")
    with pytest.raises(DatasetError, match=r"^labels '01' and '1' are the same number; give each class one id"):
        build_dataset(DatasetConfig(name="csv", path=str(tmp_path / "z.csv"), class_names=str(tmp_path / "zn.csv")))


def test_a_class_names_file_that_names_each_label_itself_keeps_the_store(tmp_path):
    """Same images, names and labels: the same fingerprint (the order is hashed only where it is not
    the names' own)."""
    (tmp_path / "n.json").write_text('{"triangle": "triangle", "circle": "circle", "square": "square"}')
    plain = build_dataset(DatasetConfig(num_classes=3))
    named = build_dataset(DatasetConfig(num_classes=3, class_names=str(tmp_path / "n.json")))
    assert named.classes == plain.classes and named.fingerprint() == plain.fingerprint()


def test_class_names_that_would_pass_wrong_data_are_refused(tmp_path, monkeypatch):
    csv_path = _numbered_csv(tmp_path)

    def build(text, suffix=".csv"):
        f = tmp_path / f"names{suffix}"
        f.write_text(text)
        return build_dataset(DatasetConfig(name="csv", path=csv_path, class_names=str(f)))

    with pytest.raises(DatasetError, match=r"no name for label '10' \(1 of the dataset's 3 labels unnamed\); add a line 10,"):
        build("label,name\n1,tench\n2,goldfish\n")
    with pytest.raises(DatasetError, match=r"no name for label '10' .*; add \"10\": \"<name>\""):
        build('{"1": "tench", "2": "goldfish"}', ".json")
    with pytest.raises(DatasetError, match=r"gives labels '2' and '10' the same name \('crane', 'Crane'\)"):
        build("label,name\n1,tench\n2,crane\n10,Crane\n")
    # two labels named alike are refused even where one has no image: the file itself is ambiguous
    with pytest.raises(DatasetError, match="gives labels '2' and '77' the same name"):
        build("label,name\n1,tench\n2,crane\n10,shark\n77,crane\n")
    with pytest.raises(DatasetError, match="names label '2' twice"):
        build("label,name\n1,tench\n2,goldfish\n2,carp\n10,shark\n")
    with pytest.raises(DatasetError, match="names label '1' twice"):  # JSON keeps a repeated key's last value
        build('{"1": "tench", "2": "goldfish", "10": "shark", "1": "carp"}', ".json")
    with pytest.raises(DatasetError, match="row 3: no name; give every row its label,name"):
        build("label,name\n1,tench\n2,\n10,shark\n")
    with pytest.raises(DatasetError, match=r"row 3: 1 field\(s\) more than the header; .*quote a value that holds a comma"):
        build("label,name\n1,tench\n2,hot dog, sausage\n10,shark\n")  # was named 'hot dog', the rest dropped
    with pytest.raises(DatasetError, match="it needs a header with label,name"):
        build("1,tench\n2,goldfish\n10,shark\n")
    with pytest.raises(DatasetError, match="not valid JSON"):
        build('{"1": "tench",}', ".json")
    with pytest.raises(DatasetError, match="one JSON object"):
        build('["tench", "goldfish"]', ".json")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match=f"nope.csv not found \\(a relative path, taken from the working folder "
                                           f"{tmp_path}\\); set dataset.class_names"):
        build_dataset(DatasetConfig(name="csv", path=csv_path, class_names="nope.csv"))
    (tmp_path / "adir").mkdir()  # a folder was "not found" (a fuzz)
    with pytest.raises(DatasetError, match=r"class-names file adir is a folder, not a file; set dataset.class_names"):
        build_dataset(DatasetConfig(name="csv", path=csv_path, class_names="adir"))
    with pytest.raises(DatasetError, match=r"^CSV manifest adir is a folder, not a file; set it with --set dataset.path"):
        build_dataset(DatasetConfig(name="csv", path="adir"))


@pytest.mark.parametrize("name", ["domainbed", "folder"])
def test_a_folder_dataset_given_a_file_says_so(tmp_path, name):
    """A CSV given to a folder dataset was said not to exist."""
    csv_path = _numbered_csv(tmp_path)
    with pytest.raises(DatasetError, match=r"x.csv is a file, not the folder .*; a CSV manifest takes --set dataset.name=csv"):
        build_dataset(DatasetConfig(name=name, path=csv_path))


def test_a_folder_scan_lists_what_sorted_rglob_lists_in_its_order(tmp_path):
    """The scan walks folders with os.scandir (a tenth of rglob's time on PACS); a store's rows and its
    dataset's fingerprint follow the scan's order, so it must be the order sorted(rglob) gave, with the
    same files: names that sort differently as strings and as paths ('a/x' before 'a-b', '/' > '-'),
    nested and hidden folders, files of other types, and symlinks (a linked file is read, a linked
    folder is not entered)."""
    import os

    from embedcache.datasets import IMAGE_EXTENSIONS

    root = tmp_path / "data"
    names = ["a/x.png", "a-b.jpg", "a.b/c.PNG", "A.jpg", "b/.hid/y.jpg", "b/z/.q.jpg", "b/z/w.jpeg", "c.txt",
             "d/e/f/g.jpg", "10.jpg", "9.jpg", "a_b.jpg", ".ipynb_checkpoints/k.jpg", "n.heic"]
    for dom in ("d1", "d2"):
        for cls in ("cat", "dog"):
            for k, name in enumerate(names):
                f = root / dom / cls / name
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_bytes(b"x" * (k + 1))
            os.symlink(root / dom / cls / "a", root / dom / cls / "linked_dir")
            os.symlink(root / dom / cls / "A.jpg", root / dom / cls / "linked.jpg")
    expected, hidden, others = [], 0, []
    for dom in ("d1", "d2"):
        for cls in ("cat", "dog"):
            folder = root / dom / cls
            for p in sorted(folder.rglob("*")):  # the scan as it was
                if not p.is_file():
                    continue
                image = p.suffix.lower() in IMAGE_EXTENSIONS
                if any(part.startswith(".") for part in p.relative_to(folder).parts):
                    hidden += image
                elif image:
                    expected.append((p.relative_to(root).as_posix(), p.stat().st_size))
                else:
                    others.append(p.name)
    with pytest.warns(UserWarning, match=r"4 image files of a type not read left out \(n.heic"):
        ds = build_dataset(DatasetConfig(name="domainbed", path=str(root)))
    assert [(s.path, s.size) for s in ds.samples] == expected
    assert ds.hidden_images == hidden == 12 and sorted(set(others)) == ["c.txt", "n.heic"]
    assert "d1/cat/linked.jpg" in [s.path for s in ds.samples]
    assert not any("linked_dir" in s.path for s in ds.samples)
    folder = build_dataset(DatasetConfig(name="folder", path=str(root / "d1")))
    assert [s.path for s in folder.samples] == [p.split("/", 1)[1] for p, _ in expected if p.startswith("d1/")]


def test_a_folder_the_scan_cannot_list_is_refused_in_one_line(tmp_path, monkeypatch):
    """rglob skipped a folder it could not list, and every image in it, without a word."""
    import os

    from embedcache import datasets

    for name in ("d/c/ok.png", "d/c/locked/x.png"):
        f = tmp_path / name
        f.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(f)
    real = os.scandir

    def scandir(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(datasets.os, "scandir", scandir)
    with pytest.raises(DatasetError, match=r"locked cannot be read \(Permission denied\), so its images cannot be "
                                           r"listed; give read access to it \(its owner: chmod -R a\+rX .*locked\)"):
        build_dataset(DatasetConfig(name="domainbed", path=str(tmp_path)))
    # a hidden one, or a file system's lost+found, holds none of the dataset's images: skipped, as before (a review)
    for name in (".locked", "lost+found"):
        (tmp_path / "d/c/locked").rename(tmp_path / "d/c" / name)
        monkeypatch.setattr(datasets.os, "scandir", lambda path, n=name: (
            (_ for _ in ()).throw(PermissionError(13, "Permission denied", str(path))) if str(path).endswith(n)
            else real(path)))
        assert [s.path for s in build_dataset(DatasetConfig(name="domainbed", path=str(tmp_path))).samples] == ["d/c/ok.png"]
        (tmp_path / "d/c" / name).rename(tmp_path / "d/c/locked")


def test_a_symlink_loop_in_a_dataset_folder_is_left_out_as_rglob_left_it(tmp_path):
    """os.scandir's is_file raises on a link that loops where Path.is_file said False: a traceback (a review)."""
    import os

    (tmp_path / "d" / "c").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "d" / "c" / "a.png")
    os.symlink("loop", tmp_path / "d" / "c" / "loop")  # points at itself
    os.symlink("loop.png", tmp_path / "d" / "c" / "loop.png")
    assert [s.path for s in build_dataset(DatasetConfig(name="domainbed", path=str(tmp_path))).samples] == ["d/c/a.png"]


def test_images_outside_the_class_folders_are_said_to_be_left_out(tmp_path):
    """An image at the dataset's root or beside a domain's class folders was left out without a word (a
    trial), where unread file types and classes missing from a domain are said."""
    for name in ("d/c/a.png", "d/stray.png", "top.jpg", "d/c/sub/deep.png"):
        f = tmp_path / name
        f.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(f)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.warns(UserWarning, match=r"2 image files outside the class folders left out \(top.jpg, d/stray.png\); "
                                         r"images are read as domain/class/image"):
        ds = build_dataset(DatasetConfig(name="domainbed", path=str(tmp_path)))
    assert [s.path for s in ds.samples] == ["d/c/a.png", "d/c/sub/deep.png"]  # a class's sub-folders are its own
    with pytest.warns(UserWarning, match=r"1 image file outside the class folders left out \(stray.png\); images are "
                                         r"read as class/image"):
        build_dataset(DatasetConfig(name="folder", path=str(tmp_path / "d")))


def test_folders_with_no_image_are_said_with_the_classes_they_take_out(tmp_path):
    """Empty class folders (and an empty domain folder) vanished from the class list without a word, and
    with them a class from every nearest-label score (a trial)."""
    from PIL import Image

    from embedcache.config import DatasetConfig
    from embedcache.datasets import build_dataset

    for dom, cls in (("photo", "dog"), ("photo", "horse"), ("sketch", "dog"), ("sketch", "horse")):
        (tmp_path / dom / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / dom / cls / "a.png")
    (tmp_path / "photo" / "elephant").mkdir()
    (tmp_path / "sketch" / "elephant").mkdir()
    (tmp_path / "cartoon").mkdir()
    with pytest.warns(UserWarning, match=r"3 folders with no image file \(cartoon, photo/elephant, sketch/elephant\); so "
                                         r"class 'elephant' is not in the store's class list"):
        ds = build_dataset(DatasetConfig(name="domainbed", path=str(tmp_path)))
    assert ds.classes == ["dog", "horse"]
    (tmp_path / "photo" / "elephant" / "b.png").write_bytes((tmp_path / "photo" / "dog" / "a.png").read_bytes())
    with pytest.warns(UserWarning, match=r"folders with no image file \(cartoon, sketch/elephant\); add") as got:
        build_dataset(DatasetConfig(name="domainbed", path=str(tmp_path)))
    assert not any("class list" in str(w.message) for w in got)  # elephant is a class (of photo): none lost


def test_an_empty_image_file_is_said_to_be_empty(tmp_path):
    """A zero-byte .jpg was recorded as Pillow's "cannot identify image file", which says nothing of why."""
    from embedcache.images import read_rgb8

    (tmp_path / "a.jpg").write_bytes(b"")
    with pytest.raises(OSError, match=r"^the file is empty \(0 bytes\)$"):
        read_rgb8(tmp_path / "a.jpg")


@pytest.mark.parametrize("domains,classes,said", [
    (("all", "photo"), ("cat", "dog"), "domain 'all'"),  # its rows left out of every avg, as "every domain at once"
    (("transfer", "photo"), ("cat", "dog"), "domain 'transfer'"),  # its runs' rows read as --transfer scores
    (("art,deco", "photo"), ("cat", "dog"), "domain 'art,deco'"),  # a holdout of it reads as two domains
    (("art", "photo"), ("cat", "dog;puppy"), "class 'dog;puppy'"),  # an unseen-class holdout splits at it
    (("avg", "photo"), ("cat", "dog"), "domain 'avg'"),  # its cells overwritten by the avg's (a review)
    (("replicates", "photo"), ("cat", "dog"), "domain 'replicates'"),  # in the replicate count's column
    (("unseen: x", "photo"), ("cat", "dog"), "domain 'unseen: x'"),  # read as a class split's part
])
def test_names_results_tables_would_misread_are_refused(tmp_path, domains, classes, said):
    """A domain folder named "all" gives per-domain rows that every table takes for the "all domains"
    row and leaves out of its avg, with exit 0; one named "transfer" makes a run's own rows read as
    --transfer scores (read in the code). Such names are refused when the dataset is read, naming the fix."""
    root = _make_domainbed(tmp_path / "db", domains=domains, classes=classes)
    with pytest.raises(DatasetError, match=f"{said}.*rename"):
        build_dataset(DatasetConfig(name="domainbed", path=str(root)))


def test_reserved_domain_names_cover_what_results_tables_read_otherwise():
    from embedcache.datasets import HOLDOUT_PREFIXES, RESERVED_DOMAINS
    from embedcache.evaluate.results import NOT_ONE_DOMAIN, TAGS, TRAINED_WITHOUT, TRANSFER, UNSEEN
    assert set(NOT_ONE_DOMAIN) | {TRANSFER, TAGS["holdout"], "avg", "replicates"} <= set(RESERVED_DOMAINS)
    assert all(p.startswith(h) for p, h in zip((UNSEEN, TRAINED_WITHOUT), HOLDOUT_PREFIXES))


def test_a_store_made_before_such_names_were_refused_is_not_scored(tmp_path, make_cfg, tiny_teacher, monkeypatch):
    """A store with a domain "all" made before the names were refused was scored with exit 0, its domain
    merged into the "all domains" row (a review): scoring and training refuse it, naming the fix."""
    from embedcache import datasets
    from embedcache.errors import EmbedcacheError
    from embedcache.evaluate.store_eval import teacher_baselines
    from embedcache.extract import extract
    from embedcache.students.data import StoreData

    monkeypatch.setattr(datasets, "_require_names", lambda *a: None)  # as the version that made it
    root = _make_domainbed(tmp_path / "db", domains=("all", "photo"))
    cfg = make_cfg("old.zarr", "dataset.name=domainbed", f"dataset.path={root}")
    extract(cfg, teacher=tiny_teacher, log=lambda m: None)
    said = r"domain 'all' cannot be told apart in results tables .*made before such names were refused.*new --out"
    with pytest.raises(EmbedcacheError, match=said):
        teacher_baselines(cfg.out)
    with pytest.raises(EmbedcacheError, match=said):
        StoreData(cfg.out, "name")
    import embedcache
    with embedcache.open_store(cfg.out) as s:  # an analyst still reads it
        assert set(s.meta["domain"]) == {"all", "photo"}


def test_symlinks_a_scan_leaves_out_are_said(tmp_path):
    """A broken image link and a linked folder inside a class folder were left out without a word, their
    images absent from the fingerprint too (a trial); a linked class folder is read."""
    import os
    import warnings

    root = _make_domainbed(tmp_path / "db")
    elsewhere = _make_domainbed(tmp_path / "more", domains=("x",), classes=("c",))
    os.symlink(tmp_path / "nowhere.png", root / "art" / "cat" / "broken.png")
    os.symlink(elsewhere / "x" / "c", root / "art" / "dog" / "linked")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        ds = build_dataset(DatasetConfig(name="domainbed", path=str(root)))
    lines = [str(w.message) for w in said]
    assert len(ds) == 12  # neither is read
    assert any("1 image symlink whose target is gone left out (art/cat/broken.png)" in ln for ln in lines), lines
    assert any("1 symlinked folder inside a class folder not read (art/dog/linked)" in ln for ln in lines), lines
