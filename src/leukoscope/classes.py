"""Class names across labs: a lab's folder names read as the model's classes ("Neutrophils", "LYT",
"Band" into "neutrophil"), class maps many to one (``--class-map``), and a model restricted to some of
its classes (``--classes``). The mapped or restricted model is a ``Predictor`` like any other."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence

import torch

from .data.layouts import singular
from .errors import LeukoscopeError, did_you_mean
from .inference import Predictor


def _class_map_pairs(text: str, class_names: Sequence[str]) -> list[tuple[str, str]]:
    """'Early=blast, Pre=blast' -> [(model class, data class), ...], the model's classes checked."""
    by_lower = {c.lower(): c for c in class_names}
    pairs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        source, sep, target = (x.strip() for x in part.partition("="))
        if not sep or not source or not target:
            raise LeukoscopeError(f"--class-map: expected MODEL_CLASS=DATA_CLASS pairs separated by commas, got {part!r}")
        if source.lower() not in by_lower:
            raise LeukoscopeError(f"--class-map: the model has no class {source!r}{did_you_mean(source, class_names)}; "
                                  f"its classes: {', '.join(class_names)}")
        pairs.append((by_lower[source.lower()], target))
    return pairs


def parse_class_map(text: str, class_names: Sequence[str]) -> dict[str, str]:
    """'Early=blast,Pre=blast,Benign=normal' -> {model class: data class}; unnamed classes map to themselves.

    A model class given several data classes ('neutrophil=band,neutrophil=seg': a lab that keeps
    subtypes apart) maps to their merger 'band+seg' (see ``class_map_merges``)."""
    mapping = {c: c for c in class_names}
    mapping.update({source: "+".join(targets) for source, targets in _targets(_class_map_pairs(text, class_names)).items()})
    return mapping


def class_map_merges(text: str, class_names: Sequence[str]) -> dict[str, str]:
    """{data class: merged label} for the data classes that ``text`` gives one model class together."""
    merges = {}
    for targets in _targets(_class_map_pairs(text, class_names)).values():
        if len(targets) > 1:
            merges.update({t: "+".join(targets) for t in targets})
    return merges


def _targets(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    targets: dict[str, list[str]] = {}
    for source, target in pairs:
        if target not in targets.setdefault(source, []):
            targets[source].append(target)
    return targets


# Other names labs give the white-cell types, as folder names (compared in lower case, letters only):
# abbreviations of atlases and datasets (LISC's "baso", Munich AML's "LYT", "EBO") and plain synonyms.
CLASS_ALIASES = {"neu": "neutrophil", "neut": "neutrophil", "lym": "lymphocyte", "lymph": "lymphocyte", "lymp": "lymphocyte",
                 "lyt": "lymphocyte", "mon": "monocyte", "mono": "monocyte", "eos": "eosinophil", "eosi": "eosinophil",
                 "eosino": "eosinophil", "bas": "basophil", "baso": "basophil", "plt": "platelet", "thrombocyte": "platelet",
                 "nrbc": "erythroblast", "ebo": "erythroblast", "immaturegranulocyte": "ig"}
# The same in the languages of the labs that publish blood-cell atlases (Spanish, Portuguese, Italian, French,
# German), accents dropped; plurals other than a final s listed as they are.
WORDS = {"neutrophil": "neutrofilo neutrofili neutrophile neutrophiler neutrophilen neutrofilos",
         "lymphocyte": "linfocito linfocita linfociti lymphozyt lymphozyten",
         "monocyte": "monocito monocita monociti monozyt monozyten",
         "eosinophil": "eosinofilo eosinofili eosinophile eosinophiler eosinophilen",
         "basophil": "basofilo basofili basophile basophiler basophilen",
         "platelet": "plaqueta piastrina piastrine plaquette thrombozyt thrombozyten trombocito trombocita trombociti",
         "erythroblast": "eritroblasto eritroblasti erythroblaste erythroblasten normoblasto normoblast normoblasten",
         "ig": "granulocitoinmaduro granulocitosinmaduros granulocitoimaturo granulocitiimmaturi granulocyteimmature "
               "granulocytesimmatures unreifegranulozyten"}
CLASS_ALIASES.update({word: cls for cls, words in WORDS.items() for word in words.split()})
# Subtypes that one of PBC's classes holds: its neutrophil folder holds band and segmented cells (its file names
# start BNE_ and SNE_), its ig folder metamyelocytes, myelocytes and promyelocytes. Munich AML's NGB, NGS, MMZ,
# MYB and PMO are these. A lab that keeps them apart is scored against the model's class (see subtype_merges).
SUBTYPES = {"band": "neutrophil", "bandneutrophil": "neutrophil", "seg": "neutrophil", "segmented": "neutrophil",
            "segmentedneutrophil": "neutrophil", "ngb": "neutrophil", "ngs": "neutrophil", "bne": "neutrophil",
            "sne": "neutrophil", "metamyelocyte": "ig", "myelocyte": "ig", "promyelocyte": "ig", "mmz": "ig", "myb": "ig",
            "pmo": "ig", "cayado": "neutrophil", "neutrofiloencayado": "neutrophil", "segmentado": "neutrophil",
            "neutrofilosegmentado": "neutrophil", "stabkernige": "neutrophil", "segmentkernige": "neutrophil",
            "metamielocito": "ig", "mielocito": "ig", "promielocito": "ig", "metamyelozyt": "ig", "myelozyt": "ig",
            "promyelozyt": "ig", "metamielocita": "ig", "mielocita": "ig", "promielocita": "ig",
            # the stage folders of tools/make_wbc_data.py --subtypes
            "neutrophilband": "neutrophil", "neutrophilsegmented": "neutrophil", "igmetamyelocyte": "ig", "igmyelocyte": "ig",
            "igpromyelocyte": "ig"}


def _is_subtype(name: str) -> bool:
    key = _letters(name)
    return key in SUBTYPES or (key.endswith("s") and key[:-1] in SUBTYPES)  # "Myelocytes"


def subtype_merges(data_classes: Iterable[str], class_names: Sequence[str]) -> dict[str, str]:
    """{data class: merged label} for data classes that are subtypes of one model class (``SUBTYPES``):
    "Band" goes into "Neutrophils" when the data has both; "NGB" and "NGS" without a neutrophil folder
    become the model's "neutrophil". Two folders that both name the class itself ("Neutrophils",
    "NEUTROPHIL") are not merged: that is ambiguous, not a subtype."""
    if any(_is_subtype(c) for c in class_names):
        return {}  # a model that tells subtypes apart itself (a lab's model with a band class)
    groups: dict[str, list[str]] = {}
    for data_class in sorted(set(data_classes)):
        model_class = _name_key(data_class)
        if model_class in class_names:
            groups.setdefault(model_class, []).append(data_class)
    merges: dict[str, str] = {}
    for model_class, members in groups.items():
        whole = [m for m in members if not _is_subtype(m)]
        if len(members) < 2 or len(whole) > 1:
            continue
        label = whole[0] if whole else model_class
        merges.update({m: label for m in members if m != label})
    return merges


def _letters(name: str) -> str:
    """The name in lower case, letters only, accents dropped ("Eosinófilo" -> "eosinofilo")."""
    return "".join(ch for ch in unicodedata.normalize("NFKD", name.lower()) if ch.isalpha())


def _name_key(name: str, subtypes: bool = True) -> str:
    """The model class a data folder's name stands for, if it is a known name: the name in lower case,
    letters only, through CLASS_ALIASES (and SUBTYPES, unless ``subtypes`` is False: a model with a
    subtype class of its own), a plural ("Neutrophils") made singular."""
    aliases = {**SUBTYPES, **CLASS_ALIASES} if subtypes else CLASS_ALIASES
    key = _letters(name)
    if key not in aliases:
        key = singular(key)
    return aliases.get(key, key)


def match_class_names(data_classes: Iterable[str], class_names: Sequence[str], partial: bool = False) -> dict[str, str] | None:
    """{model class: data class} for data whose class names differ from the model's only in case, a
    plural or a common abbreviation ("Neutrophils", "LYMPHOCYTE", "baso"); None unless every data class
    the model does not know matches exactly one model class that no other data class takes
    (``partial``: data classes that match none are left out instead)."""
    data_classes = set(data_classes)
    subtypes = not any(_is_subtype(c) for c in class_names)  # a model with a band class keeps "band" apart
    by_key = {_name_key(c, subtypes): c for c in class_names}
    mapping: dict[str, str] = {}
    for data_class in sorted(data_classes - set(class_names)):
        model_class = by_key.get(_name_key(data_class, subtypes))
        if model_class is None and partial:
            continue
        if model_class is None or model_class in mapping or model_class in data_classes:
            return None
        mapping[model_class] = data_class
    return mapping or None


def map_classes(predictor: Predictor, mapping: dict[str, str], tta: bool | str | None = None) -> Predictor:
    """The same model answering in other class names, many to one (``aria-all``'s Early, Pre and Pro as
    ``blast``): a target's probability is the sum of its classes' calibrated probabilities.

    The base model's test-time augmentation and temperature are applied inside; the operating
    threshold, which belonged to the old classes, is dropped.
    """
    targets = list(dict.fromkeys(mapping[c] for c in predictor.class_names))
    groups = [[i for i, c in enumerate(predictor.class_names) if mapping[c] == t] for t in targets]

    def backend(batch_uint8: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(predictor.logits(batch_uint8, tta) / predictor.temperature, dim=1)
        return torch.stack([log_probs[:, g].logsumexp(dim=1) for g in groups], dim=1)

    backend.kind = predictor.kind  # type: ignore[attr-defined]
    meta = {**predictor.meta, "class_names": targets, "temperature": 1.0, "threshold": None, "tta": "none", "ood_threshold": None,
            "class_map": {c: mapping[c] for c in predictor.class_names}}  # no state_dict: heatmaps need the unmapped model
    meta.pop("positive_index", None)
    return Predictor(meta, source=predictor.source, backend=backend)


def model_class(name: str, class_names: Sequence[str], option: str = "--class") -> str:
    """The model's class that ``name`` names, its case and a plural's s ignored ('Eosinophils' -> 'eosinophil'), or
    a name labs give it (``CLASS_ALIASES``: 'Linfocitos', 'LYT'); a one-line error naming ``option`` and the model's
    classes otherwise."""
    found = [c for c in class_names if c.lower() == name.lower()]
    found = found or [c for c in class_names if singular(c.lower()) == singular(name.lower())]
    found = found or [c for c in class_names if _name_key(c, False) == _name_key(name, False)]
    if len(found) != 1:
        raise LeukoscopeError(f"{option}: the model has no class {name!r}{did_you_mean(name, class_names)}; "
                              f"its classes: {', '.join(class_names)}")
    return found[0]


def parse_classes(text: str, class_names: Sequence[str]) -> list[str]:
    """'basophil, Eosinophils,...' -> those of the model's classes (case and a plural's s ignored), in the model's order."""
    chosen = {model_class(name, class_names, "--classes") for name in filter(None, (p.strip() for p in text.split(",")))}
    if len(chosen) < 2:
        raise LeukoscopeError(f"--classes: name at least two of the model's classes ({', '.join(class_names)}), got {text!r}")
    return [c for c in class_names if c in chosen]


def restrict_classes(predictor: Predictor, classes: Sequence[str], tta: bool | str | None = None) -> Predictor:
    """The same model choosing only among ``classes`` (a lab whose images hold only those types): the
    others' logits are dropped, so each kept class's calibrated probability is renormalised over the
    kept ones. The out-of-domain alarm stays; a binary model's operating threshold, which belonged to
    all of its classes, is dropped. The base model's test-time augmentation is applied inside."""
    if list(classes) == list(predictor.class_names):
        return predictor
    columns = [predictor.class_names.index(c) for c in classes]

    def backend(batch_uint8: torch.Tensor) -> torch.Tensor:
        logits, ood = predictor.logits_and_ood(batch_uint8, tta)
        kept = logits[:, columns]
        return kept if ood is None else torch.cat([kept, ood[:, None]], dim=1)

    backend.kind = predictor.kind  # type: ignore[attr-defined]
    meta = {**predictor.meta, "class_names": list(classes), "threshold": None, "tta": "none",
            "restricted_from": list(predictor.class_names)}  # no state_dict: heatmaps come from the whole model
    meta.pop("positive_index", None)
    return Predictor(meta, source=predictor.source, backend=backend, whole=predictor.whole or predictor)
