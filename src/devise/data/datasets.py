"""Labelled image collections: the dataset registry, class-per-folder trees, and their splits.

`load_dataset(name | folder)` -> `ImageDataset`. A name is looked up in the registry (`DATASETS`,
`list_datasets()`): a built-in dataset module registers itself with `register_dataset` when the package
is imported, as timm's model modules do with `register_model`. Anything else is a folder holding one
sub-folder per class, optionally below split folders (train/val/test). A class folder is named by a word
or phrase ("water buffalo", "tabby_cat") or by a WordNet noun id ("n02123045", as ImageNet does), which is
resolved to the synset's first lemma. Every class is linked to a WordNet noun synset where one matches
(`match_class_name`).

`zero_shot_split` divides the classes into seen (trained on) and unseen (zero-shot) ones and holds one
style of the seen classes out as the seen-class test set (unseen_fraction=0: every class is seen, only
test images are held out); `validation_split` carves validation classes out of the seen ones for
choosing hyper-parameters without touching the unseen classes; `seen_validation_split` instead holds
out images of every seen class (for datasets with too few classes for zero-shot validation).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from devise.errors import DeviseError
from devise.data.images import scan_image_files, warn_skipped
from devise.labels.wordnet import load_wordnet

SPLIT_NAMES = ("train", "val", "test")
# Other spellings of the split folders, mapped to the names above.
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}
WNID_PATTERN = re.compile(r"^n\d{8}$")
# Trailing words that name a view of the thing, not the thing: "cow face" is a cow.
IGNORED_HEAD_WORDS = {"face"}
# Words after which a name qualifies its head: "glass of milk", "bowl with spoon", "sun behind cloud".
QUALIFIER_WORDS = {"of", "with", "showing", "behind", "in", "on", "at", "for", "from", "and"}
DEFAULT_TEST_STYLE = "twitter"


@dataclass
class ImageDataset:
    """Images with class labels.

    paths: one file per image; labels: int32 index into `classes` per image; classes: display names
    ("water buffalo"); wnids: WordNet noun id per class or None; match: how each class's synset was found
    ("wnid": the folder was named by it, "exact": the whole name is a lemma, "head": the head noun or a
    trailing part of the name is, "none"); styles: per-image drawing style (styled datasets) or None;
    splits: per-image "train"/"val"/"test" when the folder had split sub-folders, else None.
    """

    name: str
    root: str
    paths: list[str]
    labels: np.ndarray
    classes: list[str]
    wnids: list[str | None]
    styles: np.ndarray | None = None
    splits: np.ndarray | None = None
    match: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ------------------------------------------------------------------ the registry

@dataclass(frozen=True)
class DatasetEntry:
    """One registered dataset.

    load() -> the ImageDataset (building it first if needed); prepare() builds its heavy data into the
    data home (`devise setup-assets`; None: nothing to build); holdout_unseen: the fraction of classes a
    training run holds out as unseen unless told otherwise; check() -> where its built data is, or a
    DeviseError saying how to build it (`devise doctor`; None: nothing to check); description: one line.
    """

    name: str
    load: Callable[[], ImageDataset]
    prepare: Callable[[], object] | None = None
    holdout_unseen: float = 0.25
    check: Callable[[], str] | None = None
    description: str = ""


DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(name: str, load: Callable[[], ImageDataset], prepare: Callable[[], object] | None = None,
                     holdout_unseen: float = 0.25, check: Callable[[], str] | None = None,
                     description: str = "") -> DatasetEntry:
    """Make `name` a dataset that load_dataset, `devise train/features/benchmark` and setup-assets know.

    A dataset module calls this at import; registering a name again replaces its entry."""
    if not 0 <= holdout_unseen < 1:
        raise DeviseError(f"holdout_unseen={holdout_unseen}: must be at least 0 and below 1")
    entry = DatasetEntry(name, load, prepare, float(holdout_unseen), check, description)
    DATASETS[name] = entry
    return entry


def list_datasets() -> list[str]:
    """The dataset names load_dataset accepts besides folders."""
    return list(DATASETS)


def default_holdout_unseen(spec) -> float:
    """The fraction of classes held out as unseen by default: the registered value for a dataset name,
    0 for anything else (a user's folder trains on all its classes)."""
    entry = DATASETS.get(str(spec))
    return entry.holdout_unseen if entry is not None else 0.0


# ------------------------------------------------------------------ WordNet matching

def _singular_forms(word: str) -> list[str]:
    """The word and naive singulars of it ("cherries" -> "cherry", "dolls" -> "doll")."""
    forms = [word]
    if word.endswith("ies") and len(word) > 4:
        forms.append(word[:-3] + "y")
    if word.endswith("es") and len(word) > 3:
        forms.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        forms.append(word[:-1])
    return forms


def _name_variants(name: str) -> list[str]:
    """Spellings of a whole name to look up: as written, hyphens as spaces, hyphens dropped."""
    name = " ".join(name.replace("’", "'").split())
    variants = [name, name.replace("-", " "), name.replace("-", "")]
    return list(dict.fromkeys(v for v in variants if v))


def match_class_name(name: str, lookup: Callable[[str], list[str]]) -> tuple[str | None, str]:
    """(wnid, how) for a class name; `lookup(lemma)` returns noun synset ids, most frequent sense first.

    "exact": the whole name (or its hyphen-free spelling) is a lemma -> its first sense.
    "head": else the longest trailing part of the name's head phrase that is a lemma, down to the head noun
    itself: the head phrase is the name cut before a qualifier ("glass of milk" -> "glass"), trailing view
    words dropped ("cow face" -> "cow"), punctuation stripped, a naive singular tried ("dolls" -> "doll").
    "none": nothing matched (wnid None).
    """
    for variant in _name_variants(name):
        hits = lookup(variant)
        if hits:
            return hits[0], "exact"
    words = re.sub(r"[^\w\s'-]", " ", name.replace("’", "'")).lower().replace("-", " ").split()
    for i, word in enumerate(words):
        if i > 0 and word in QUALIFIER_WORDS:
            words = words[:i]
            break
    while len(words) > 1 and words[-1] in IGNORED_HEAD_WORDS:
        words = words[:-1]
    words = [w.strip("'") for w in words]
    words = [w[:-2] if w.endswith("'s") else w for w in words]
    words = [w for w in words if w]
    for start in range(len(words)):
        *front, head = words[start:]
        for form in _singular_forms(head):
            hits = lookup(" ".join([*front, form]))
            if hits:
                return hits[0], "head"
    return None, "none"


PHYSICAL_ENTITY = "n00001930"  # physical_entity.n.01: things an image can show
PERSON = "n00007846"  # person.n.01
ORGANISM = "n00004475"
NATURAL_OBJECT = "n00019128"
FOOD = ("n00021265", "n07555863")  # food/nutrient, solid food
ARTIFACT = "n00021939"


def _ancestors(wordnet, wnid: str) -> set[str]:
    """wnid and every synset above it (hypernyms and instance hypernyms)."""
    seen, stack = {wnid}, [wnid]
    while stack:
        for parent in wordnet.hypernyms(stack.pop()):
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def wordnet_lookup(prefer: tuple[str, ...] = (), wordnet=None) -> Callable[[str], list[str]]:
    """WordNet 3.0 lemma -> noun synsets, the senses an image is likely to show first.

    WordNet's sense order (most frequent first) is kept within three tiers: senses below one of the
    `prefer` synsets (e.g. ARTIFACT for pictured objects), then other physical things, then the rest
    (abstractions, and people: WordNet files many animal and object words first as kinds of person). So an image class "tiger" is the big cat, not "a fierce
    person" (tiger.n.01), and "saw" the tool, not the proverb. A lemma with one sense gets that sense.
    """
    if wordnet is None:
        wordnet = load_wordnet()
    ancestors: dict[str, set[str]] = {}

    def tier(wnid: str) -> int:
        if wnid not in ancestors:
            ancestors[wnid] = _ancestors(wordnet, wnid)
        above = ancestors[wnid]
        if PERSON in above:  # people (and named people) are never what an object image shows first
            return 2
        if any(root in above for root in prefer):
            return 0
        return 1 if PHYSICAL_ENTITY in above else 2

    def lookup(lemma: str) -> list[str]:
        return sorted(wordnet.synsets_for(lemma), key=tier)  # stable: WordNet's order within a tier

    return lookup


# ------------------------------------------------------------------ class-per-folder trees

def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def folder_class_name(folder_name: str) -> str:
    """Display name from a class folder's name: underscores as spaces, a numeric prefix ("001.") dropped."""
    name = re.sub(r"^\d+[._-]", "", folder_name.strip())
    return " ".join(name.replace("_", " ").split()) or folder_name


def load_folder_dataset(root: str | os.PathLike, lookup: Callable[[str], list[str]] | None = None) -> ImageDataset:
    """A class-per-folder tree (optionally below train/val/test folders) as an ImageDataset.

    Files are found by suffix by the one walker (devise.data.images.scan_image_files): entries that are not
    readable files (broken or looping links, FIFOs...) are left out and listed in one warning; images that
    fail to decode are skipped later, when they are decoded.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        names = ", ".join(repr(name) for name in DATASETS)
        raise DeviseError(f"{root}: no such folder (expected {names + ' or ' if names else ''}a folder with one "
                          "sub-folder per class)")
    top = _visible_dirs(root)
    split_dirs = [d for d in top if d.name.lower() in SPLIT_ALIASES]
    if split_dirs and len(split_dirs) == len(top):
        sources = [(SPLIT_ALIASES[d.name.lower()], d) for d in split_dirs]
    else:
        sources = [(None, root)]
    per_class: dict[str, list[tuple[str | None, str]]] = {}
    skipped: list[str] = []
    for split, folder in sources:
        for class_dir in _visible_dirs(folder):
            files, bad = scan_image_files([class_dir])
            if not files:
                raise DeviseError(f"{class_dir}: class folder holds no image files"
                                  + (f" (skipped: {'; '.join(bad)})" if bad else ""))
            skipped += bad
            per_class.setdefault(class_dir.name, []).extend((split, f) for f in files)
    if not per_class:
        raise DeviseError(f"{root}: no class sub-folders (expected one sub-folder of images per class)")
    warn_skipped(skipped)

    folder_names = sorted(per_class)
    wordnet = None
    classes, wnids, match = [], [], []
    for folder_name in folder_names:
        if WNID_PATTERN.match(folder_name):
            if wordnet is None:
                wordnet = load_wordnet()
            if folder_name not in wordnet:
                raise DeviseError(f"{root / folder_name}: folder is named like a WordNet id but {folder_name} "
                                  "is not a WordNet 3.0 noun synset")
            classes.append(wordnet.name(folder_name))
            wnids.append(folder_name)
            match.append("wnid")
        else:
            name = folder_class_name(folder_name)
            if lookup is None:
                lookup = wordnet_lookup()
            wnid, how = match_class_name(name, lookup)
            classes.append(name)
            wnids.append(wnid)
            match.append(how)

    paths, labels, splits = [], [], []
    for split_name in (None, *SPLIT_NAMES):
        for label, folder_name in enumerate(folder_names):
            for split, path in per_class[folder_name]:
                if split == split_name:
                    paths.append(path)
                    labels.append(label)
                    splits.append(split)
    return ImageDataset(
        name=root.name, root=str(root), paths=paths, labels=np.asarray(labels, np.int32), classes=classes,
        wnids=wnids, styles=None, splits=None if sources[0][0] is None else np.asarray(splits), match=match,
    )


def load_dataset(spec: str | os.PathLike) -> ImageDataset:
    """A registered dataset by name (list_datasets(); built on first use), else a class-per-folder tree."""
    entry = DATASETS.get(str(spec))
    return entry.load() if entry is not None else load_folder_dataset(spec)


def prepare_assets() -> None:
    """Build the heavy offline data of every registered dataset into the data home; quick when built."""
    for entry in DATASETS.values():
        if entry.prepare is not None:
            entry.prepare()


# ------------------------------------------------------------------ zero-shot splits

@dataclass
class ZeroShotSplit:
    """Seen / unseen classes and image index sets of one dataset.

    seen_classes / unseen_classes: sorted class indices. train: images of seen classes outside the seen
    test set; seen_test: the seen-class test images (the held-out style, or the test split / a seeded
    image hold-out for style-less folders); unseen: every image of the unseen classes. labels: the
    dataset's per-image labels (kept so `validation_split` can work from the split alone).
    """

    seen_classes: np.ndarray
    unseen_classes: np.ndarray
    train: np.ndarray
    seen_test: np.ndarray
    unseen: np.ndarray
    test_style: str | None
    seed: int
    labels: np.ndarray


@dataclass
class ValidationSplit:
    """Validation classes carved out of the seen classes: fit on train_classes, score zero-shot on val_classes.

    train / val: image indices (from the zero-shot split's train images) of those classes. With
    zero_shot False (seen_validation_split) val_classes == train_classes and val holds their images.
    """

    train_classes: np.ndarray
    val_classes: np.ndarray
    train: np.ndarray
    val: np.ndarray
    zero_shot: bool = True  # False: val holds images of the training classes (seen_validation_split)


def _split_classes(classes: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(kept, taken): a seeded `fraction` of `classes` taken out (at least one, never all)."""
    n_take = int(round(fraction * len(classes)))
    n_take = min(max(n_take, 1), len(classes) - 1)
    order = rng.permutation(len(classes))
    taken = np.sort(classes[order[:n_take]])
    kept = np.sort(classes[order[n_take:]])
    return kept.astype(np.int64), taken.astype(np.int64)


def zero_shot_split(dataset: ImageDataset, seed: int = 0, unseen_fraction: float = 0.25,
                    test_style: str | None = None) -> ZeroShotSplit:
    """A seeded seen/unseen class split (default 75% / 25%), deterministic given the seed.

    unseen_fraction=0: no unseen classes (every class is seen; a user's folder trained on all its classes).
    Seen-class test images: for a styled dataset, every image of the held-out `test_style`
    (default DEFAULT_TEST_STYLE, "twitter"); for a folder with split sub-folders, its "test"
    (or, without one, "val") images; otherwise a seeded 20% of each seen class's images.
    """
    if not 0 <= unseen_fraction < 1:
        raise DeviseError(f"unseen_fraction={unseen_fraction}: must be at least 0 and below 1")
    if dataset.num_classes < 2:
        raise DeviseError(f"{dataset.name}: a zero-shot split needs at least 2 classes, found {dataset.num_classes}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(dataset.labels)
    if unseen_fraction == 0:
        seen, unseen = np.arange(dataset.num_classes, dtype=np.int64), np.zeros(0, np.int64)
    else:
        seen, unseen = _split_classes(np.arange(dataset.num_classes), unseen_fraction, rng)
    is_seen = np.isin(labels, seen)
    if dataset.styles is not None:
        styles = np.asarray(dataset.styles)
        test_style = test_style or DEFAULT_TEST_STYLE
        if test_style not in set(styles.tolist()):
            raise DeviseError(f"test_style={test_style!r}: not a style of {dataset.name} "
                              f"(styles: {', '.join(sorted(set(styles.tolist())))})")
        held_out = styles == test_style
    elif test_style is not None:
        raise DeviseError(f"test_style={test_style!r}: {dataset.name} has no styles")
    elif dataset.splits is not None and np.isin(dataset.splits, ["test", "val"]).any():
        splits = np.asarray(dataset.splits)
        held_out = splits == ("test" if (splits == "test").any() else "val")
    else:
        held_out = np.zeros(len(labels), bool)
        for c in seen:
            members = np.flatnonzero(labels == c)
            n_out = int(round(0.2 * len(members)))
            if len(members) > 1 and n_out:
                held_out[rng.choice(members, n_out, replace=False)] = True
    return ZeroShotSplit(
        seen_classes=seen, unseen_classes=unseen,
        train=np.flatnonzero(is_seen & ~held_out), seen_test=np.flatnonzero(is_seen & held_out),
        unseen=np.flatnonzero(~is_seen), test_style=test_style, seed=seed, labels=labels,
    )


def validation_split(split: ZeroShotSplit, seed: int = 0, fraction: float = 0.2) -> ValidationSplit:
    """Hold out a seeded `fraction` of the seen classes as validation classes (zero-shot on them)."""
    if not 0 < fraction < 1:
        raise DeviseError(f"fraction={fraction}: must be between 0 and 1")
    if len(split.seen_classes) < 2:
        raise DeviseError("validation_split needs at least 2 seen classes")
    rng = np.random.default_rng([seed, 1])  # its own stream: independent of the seen/unseen draw
    train_classes, val_classes = _split_classes(split.seen_classes, fraction, rng)
    train_labels = split.labels[split.train]
    return ValidationSplit(
        train_classes=train_classes, val_classes=val_classes,
        train=split.train[np.isin(train_labels, train_classes)], val=split.train[np.isin(train_labels, val_classes)],
    )


def seen_validation_split(split: ZeroShotSplit, seed: int = 0, fraction: float = 0.2) -> ValidationSplit:
    """Hold out a seeded `fraction` of each seen class's training images as validation images.

    Every seen class stays a training class and keeps at least one training image; a class with a single
    training image gives none. For datasets with too few classes for zero-shot validation to mean anything.
    """
    if not 0 < fraction < 1:
        raise DeviseError(f"fraction={fraction}: must be between 0 and 1")
    rng = np.random.default_rng([seed, 3])  # its own stream, like validation_split's
    train_labels = split.labels[split.train]
    held = np.zeros(len(split.train), bool)
    for c in split.seen_classes:
        members = np.flatnonzero(train_labels == c)
        n_out = min(int(round(fraction * len(members))), len(members) - 1)
        if n_out > 0:
            held[rng.choice(members, n_out, replace=False)] = True
    classes = np.asarray(split.seen_classes, np.int64)
    return ValidationSplit(train_classes=classes, val_classes=classes, train=split.train[~held],
                           val=split.train[held], zero_shot=False)
