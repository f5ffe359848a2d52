"""The plugin's `image_cache {}` block: images given by URL, downloaded once per node."""

from __future__ import annotations

from nomad_vm.fields import Field

IMAGE_CACHE_BLOCK = Field(
    "image_cache",
    "block",
    "Images given by URL (a task's `image`, or a disk's `source { image }`, that is an "
    "`https://` or `http://` URL): downloaded once per node into a cache in `data_dir` "
    "(`<data_dir>/images`, addressed by sha256), verified, and used as the read-only base of "
    "each task's disk. Images no task uses are removed after `max_unused_age`, or sooner when "
    "the cache outgrows `max_size`; an image in use never is. `nomad-vm image ls | rm | gc` "
    "shows and manages it (see docs/image-cache.md).",
    fields=(
        Field(
            "max_size",
            "string",
            "Cache size beyond which unused images are removed, least recently used first "
            "(images in use are kept even beyond it). Bytes or a size with a unit.",
            default="50GiB",
        ),
        Field(
            "max_unused_age",
            "string",
            "An image no task has used for this long is removed (a duration: `90m`, `72h`, "
            "`7d`). `0s` removes an image as soon as its last task is destroyed.",
            default="168h",
        ),
        Field(
            "max_image_size",
            "string",
            "The largest image a task may download; a larger one (by its Content-Length, or "
            "as it arrives) fails the task naming its option.",
            default="20GiB",
        ),
        Field(
            "allowed_schemes",
            "list(string)",
            "URL schemes tasks may use: `https`, `http` (the checksum makes plain http "
            "safe for the bytes, not for privacy). Empty: images by URL are refused.",
            default=["https", "http"],
        ),
        Field(
            "checksum_required",
            "bool",
            "A URL image needs its sha256 (`image_checksum`, `source { checksum }`, or "
            "`?checksum=sha256:...` in the URL). Off: a URL without one is downloaded once, "
            "trusted as it came, and reused by URL until removed.",
            default=True,
        ),
        Field(
            "connect_timeout",
            "number",
            "Seconds to wait for a connection to the image's server.",
            default=10,
            minimum=1,
        ),
        Field(
            "read_timeout",
            "number",
            "Seconds a download may receive nothing before it fails (a stalled server). An "
            "interrupted download is resumed (HTTP Range) by the next attempt.",
            default=60,
            minimum=1,
        ),
        Field(
            "gc_interval",
            "string",
            "How often the plugin applies the removal policy (also after each download and "
            "each task destroyed).",
            default="10m",
        ),
    ),
)
