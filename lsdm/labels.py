"""The default label vocabulary: the breast-MRI labels the phantoms draw and policies default to.

Dependency-free on purpose: ``policies`` (which may import only pydantic) takes its default
vocabulary from here, so the vocabulary is written once. See docs/architecture.md.
"""

BREAST_MRI_LABELS: dict[int, str] = {
    0: "background",
    1: "fat",
    2: "fibroglandular",
    3: "vessel",
    4: "lesion",
}
