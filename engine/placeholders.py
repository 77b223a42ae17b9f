"""The reference model's per-image placeholder layout (docs/reference.md, "Placeholder ids").

An image becomes a run of visual positions: indicator embeddings (plain VTE rows) around
"atoms", each atom standing for one crop's visual tokens. In the prompt the whole run is
filled with the member's image pad token (engine/members.py); the model writes the embeddings
over it.
"""

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"  # Ovis2.5/2.6 only

IMAGE_ATOM = -300
IMAGE_START, CROPS_START, COL_SEP, ROW_SEP, IMAGE_END = -301, -302, -303, -304, -305
NUM_INDICATORS = 5


def indicator_vte_row(indicator: int, visual_vocab_size: int) -> int:
    """-301 takes VTE row V-5, ..., -305 takes row V-1 (vLLM's built-in reverses this)."""
    assert IMAGE_END <= indicator <= IMAGE_START, indicator
    return visual_vocab_size - NUM_INDICATORS + (IMAGE_START - indicator)


def image_layout(grid: tuple[int, int]) -> list[int]:
    """Atoms and indicators of one image with a (rows, cols) crop grid, in prompt order.

    The first atom is the global view (or the image itself for a 1x1 grid)."""
    rows, cols = grid
    layout = [IMAGE_START, IMAGE_ATOM, CROPS_START]
    if rows * cols > 1:
        for r in range(rows):
            for c in range(cols):
                layout.append(IMAGE_ATOM)
                if c < cols - 1:
                    layout.append(COL_SEP)
            if r < rows - 1:
                layout.append(ROW_SEP)
    layout.append(IMAGE_END)
    return layout


def num_crops(grid: tuple[int, int]) -> int:
    """Crops fed to the vision tower: the grid, plus the global view when it has several."""
    k = grid[0] * grid[1]
    return k if k == 1 else k + 1


def num_image_tokens(grid: tuple[int, int], tokens_per_crop: int) -> int:
    """Placeholder positions of one image: 1x1 -> T + 3; k > 1 crops -> T*(k+1) + (k+2)."""
    layout = image_layout(grid)
    atoms = layout.count(IMAGE_ATOM)
    return atoms * tokens_per_crop + (len(layout) - atoms)


def tokens_per_crop(image_size: int, patch_size: int, hidden_stride: int) -> int:
    """The patch grid (side // patch; the convolution drops the remainder), padded up to a
    multiple of hidden_stride, then hidden_stride x hidden_stride blocks merged."""
    grid = image_size // patch_size
    merged = -(-grid // hidden_stride)
    return merged * merged
