"""Size limits shared by both ends of the wire.

The server sets ZMQ_MAXMSGSIZE on its control socket to MAX_MESSAGE_BYTES, so an oversize message
is dropped by libzmq before it is buffered; the decoder checks the same limit again (a client that
reads frames checks MAX_PIXEL_BYTES on the pixel part).
"""

MAX_MESSAGE_BYTES = 32 * 1024 * 1024  # one msgpack message (a `start` carries the image)
MAX_IMAGE_BYTES = 24 * 1024 * 1024  # encoded first image (PNG/JPEG/WebP) in `start`
MAX_PIXEL_BYTES = 64 * 1024 * 1024  # the pixel part of one frame (raw 4096x4096 RGB fits)
MAX_SIDE = 4096  # width/height of a frame, in pixels
MAX_PROMPT_CHARS = 4096  # prompt length in characters
MAX_TEXT_CHARS = 1024  # free-text fields: error/status messages, names
MAX_NAME_CHARS = 64  # identifiers: model, client name, capability
MAX_LIST_ITEMS = 32  # capability and encoding lists
MAX_CREDIT = 1 << 20  # frames granted by one `credit`
U63 = (1 << 63) - 1  # largest sequence number / seed / frame index

# msgpack decoder limits: nothing in a valid message exceeds these, so anything larger is refused
# before it is materialised.
MSGPACK_MAX_STR_BYTES = 4 * MAX_PROMPT_CHARS  # UTF-8 is at most 4 bytes a character
MSGPACK_MAX_BIN_BYTES = MAX_IMAGE_BYTES
MSGPACK_MAX_ARRAY_LEN = 64
MSGPACK_MAX_MAP_LEN = 64
