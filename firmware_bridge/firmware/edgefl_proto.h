/*
 * edgefl_proto: the edge-fl serial protocol, version 1 (see ../PROTOCOL.md), in portable C99.
 *
 * No malloc, no stdio; only <stdint.h>, <stddef.h> and <string.h>. Every buffer is fixed and sized
 * by the macros below (override them with -D before including this header, the same value in every
 * translation unit). Nothing assumes `int` is 32-bit, the host's byte order or aligned access:
 * all wire fields go through the little-endian helpers.
 *
 * Layers, each usable on its own:
 *   CRC-16/CCITT-FALSE, CRC-32 (IEEE)             edgefl_crc16 / edgefl_crc32
 *   COBS                                            edgefl_cobs_encode / edgefl_cobs_decode
 *   frames (header + payload + CRC, COBS, 0x00)     edgefl_frame_encode / edgefl_decoder_feed
 *   messages (struct <-> payload)                   edgefl_encode_<msg> / edgefl_decode_<msg>
 *   head push receiver (staging + commit)           edgefl_head_rx_*
 *   int8 head inference (head blob)                 edgefl_head_validate / edgefl_head_predict
 *   a ready-made MCU dispatcher                     edgefl_device_*
 */
#ifndef EDGEFL_PROTO_H
#define EDGEFL_PROTO_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- protocol constants ---------------------------------------------------------------------- */
#ifndef EDGEFL_PROTO_VERSION
/* Overridable only so the host tests can build a peer of another version (two mismatched peers must
 * not flood each other with ERRORs); real firmware never overrides it. */
#define EDGEFL_PROTO_VERSION 1u
#endif
#define EDGEFL_HEADER_LEN 8u
#define EDGEFL_MAX_PAYLOAD 2048u
#define EDGEFL_CRC16_MAX_PAYLOAD 256u /* length <= 256: CRC-16, else CRC-32 */
#define EDGEFL_FLAG_CRC32 0x01u
#define EDGEFL_MAX_CHUNK_DATA 1024u
/* ERROR replies (PROTOCOL.md, "Error replies"; the same rule and numbers as
 * firmware_bridge/error_replies.py): a frame of type ERROR is never answered, whatever its version,
 * and ERROR replies are held to a token bucket of RATE per second with bursts of BURST. */
#define EDGEFL_ERROR_REPLY_RATE 10u  /* ERROR replies per second, sustained */
#define EDGEFL_ERROR_REPLY_BURST 10u /* ERROR replies allowed back to back */
/* Largest body (header + payload + CRC-32) and its largest COBS encoding (without the 0x00):
 * 8 + 2048 + 4 = 2060 body bytes + 9 COBS code bytes = 2069, the decoder's buffer. */
#define EDGEFL_MAX_BODY (EDGEFL_HEADER_LEN + EDGEFL_MAX_PAYLOAD + 4u)
#define EDGEFL_COBS_MAX_ENCODED(n) ((n) + (n) / 254u + 1u)
#define EDGEFL_MAX_COBS (EDGEFL_COBS_MAX_ENCODED(EDGEFL_MAX_BODY))
/* Largest frame on the wire, delimiter included: size an output buffer with this. */
#define EDGEFL_MAX_FRAME (EDGEFL_MAX_COBS + 1u)
/* Wire size of a frame with a `len`-byte payload (upper bound). */
#define EDGEFL_FRAME_SIZE(len)                                                                              \
    (EDGEFL_COBS_MAX_ENCODED(EDGEFL_HEADER_LEN + (len) + ((len) > EDGEFL_CRC16_MAX_PAYLOAD ? 4u : 2u)) + 1u)

/* ---- configuration (override with -D) ------------------------------------------------------- */
#ifndef EDGEFL_DECODER_BUF
#define EDGEFL_DECODER_BUF EDGEFL_MAX_COBS /* must be >= EDGEFL_MAX_COBS to accept every valid frame */
#endif
#ifndef EDGEFL_HEAD_MAX_LEN
#define EDGEFL_HEAD_MAX_LEN 8192u /* largest head blob; the receiver holds two of these */
#endif
#ifndef EDGEFL_HEAD_MAX_CHUNKS
#define EDGEFL_HEAD_MAX_CHUNKS 256u
#endif
#ifndef EDGEFL_HEAD_MAX_WIDTH
#define EDGEFL_HEAD_MAX_WIDTH 256u /* widest layer (embedding_dim, adapter, classes) the device runs */
#endif
#ifndef EDGEFL_HEAD_MAX_LAYERS
#define EDGEFL_HEAD_MAX_LAYERS 8u
#endif

/* ---- message types and error codes ----------------------------------------------------------- */
enum {
    EDGEFL_MSG_HELLO = 0x01,
    EDGEFL_MSG_SENSOR_WINDOW = 0x02,
    EDGEFL_MSG_HEAD_BEGIN = 0x03,
    EDGEFL_MSG_HEAD_CHUNK = 0x04,
    EDGEFL_MSG_HEAD_COMMIT = 0x05,
    EDGEFL_MSG_ACK = 0x06,
    EDGEFL_MSG_INFER_RESULT = 0x07,
    EDGEFL_MSG_HEARTBEAT = 0x08,
    EDGEFL_MSG_ERROR = 0x09
};

/* Protocol error codes (ERROR.code, ACK.status); also returned (negated) by the message codecs. */
enum {
    EDGEFL_OK = 0,
    EDGEFL_ERR_BAD_VERSION = 1,
    EDGEFL_ERR_BAD_CRC = 2,
    EDGEFL_ERR_BAD_LENGTH = 3,
    EDGEFL_ERR_UNKNOWN_TYPE = 4,
    EDGEFL_ERR_HEAD_INCOMPLETE = 5,
    EDGEFL_ERR_HEAD_CRC = 6,
    EDGEFL_ERR_NO_HEAD = 7,
    EDGEFL_ERR_OUT_OF_MEMORY = 8,
    EDGEFL_ERR_BAD_MESSAGE = 9
};

/* Library-level return codes (negative), distinct from the protocol codes above. */
#define EDGEFL_E_ARG (-100)      /* bad argument (NULL, length out of range) */
#define EDGEFL_E_NOSPACE (-101)  /* output buffer too small */

/* ---- little-endian helpers ------------------------------------------------------------------- */
uint16_t edgefl_rd_u16(const uint8_t *p);
uint32_t edgefl_rd_u32(const uint8_t *p);
int16_t edgefl_rd_i16(const uint8_t *p);
float edgefl_rd_f32(const uint8_t *p);
void edgefl_wr_u16(uint8_t *p, uint16_t v);
void edgefl_wr_u32(uint8_t *p, uint32_t v);
void edgefl_wr_i16(uint8_t *p, int16_t v);
void edgefl_wr_f32(uint8_t *p, float v);

/* ---- CRCs -------------------------------------------------------------------------------------- */
/* Pass crc = EDGEFL_CRC16_INIT / EDGEFL_CRC32_INIT first, then the previous result to continue. */
#define EDGEFL_CRC16_INIT 0xFFFFu
#define EDGEFL_CRC32_INIT 0u /* zlib convention: crc32(0, data) */
uint16_t edgefl_crc16(uint16_t crc, const uint8_t *data, size_t len);
uint32_t edgefl_crc32(uint32_t crc, const uint8_t *data, size_t len);

/* ---- COBS -------------------------------------------------------------------------------------- */
/* Encode len bytes (no trailing 0x00 written). Returns the encoded size or EDGEFL_E_NOSPACE. */
long edgefl_cobs_encode(const uint8_t *in, size_t len, uint8_t *out, size_t out_cap);
/* Decode (without the delimiter). in == out is allowed. Returns decoded size or -1 on bad COBS. */
long edgefl_cobs_decode(const uint8_t *in, size_t len, uint8_t *out, size_t out_cap);

/* ---- frames ------------------------------------------------------------------------------------ */
typedef struct {
    uint8_t version;
    uint8_t type;
    uint16_t seq;
    uint16_t length;
    const uint8_t *payload; /* points into the decoder's buffer: valid until the next feed */
} edgefl_frame_t;

/* Writes COBS(header || payload || CRC) || 0x00 into out. Returns the wire size, or EDGEFL_E_ARG
 * (payload over 2048 bytes) / EDGEFL_E_NOSPACE. EDGEFL_FRAME_SIZE(len) bytes are always enough. */
long edgefl_frame_encode(uint8_t type, uint16_t seq, const uint8_t *payload, size_t len, uint8_t *out,
                         size_t out_cap);
/* Same with an explicit version byte (tests, future versions). */
long edgefl_frame_encode_v(uint8_t version, uint8_t type, uint16_t seq, const uint8_t *payload, size_t len,
                           uint8_t *out, size_t out_cap);

typedef struct {
    /* Same names and meaning as firmware_bridge.framing.DecoderStats. */
    uint32_t frames;             /* intact frames returned, any version (feed returned 1 or 2) */
    uint32_t bad_crc;            /* CRC mismatch */
    uint32_t bad_length;         /* body too short for header + CRC, length field != body, over 2048 */
    uint32_t bad_cobs;           /* bad COBS encoding */
    uint32_t bad_header;         /* nonzero reserved byte, unknown flag bit, CRC kind not matching length */
    uint32_t overruns;           /* more than EDGEFL_DECODER_BUF bytes without a 0x00 (once per run) */
    uint32_t version_mismatches; /* intact frames of another protocol version (feed returned 2) */
} edgefl_decoder_stats_t;

typedef struct {
    uint8_t buf[EDGEFL_DECODER_BUF];
    size_t len;
    uint8_t overrun; /* discarding until the next 0x00 */
    edgefl_decoder_stats_t stats;
} edgefl_decoder_t;

#define EDGEFL_FEED_NONE 0
#define EDGEFL_FEED_FRAME 1       /* a complete, valid frame is in *frame_out */
#define EDGEFL_FEED_BAD_VERSION 2 /* valid framing and CRC but version != 1: answer ERROR BAD_VERSION */

void edgefl_decoder_init(edgefl_decoder_t *dec);
/* Feed one byte. Returns EDGEFL_FEED_FRAME (1) when it completed a valid frame, 0 otherwise, and
 * EDGEFL_FEED_BAD_VERSION (2) for an otherwise valid frame with another version byte (its
 * version/type/seq are in *frame_out). Invalid frames are dropped and counted in dec->stats. */
int edgefl_decoder_feed(edgefl_decoder_t *dec, uint8_t byte, edgefl_frame_t *frame_out);

/* ---- messages ---------------------------------------------------------------------------------
 * Decoders return EDGEFL_OK, EDGEFL_ERR_BAD_LENGTH (payload size does not fit the type) or
 * EDGEFL_ERR_BAD_MESSAGE (contents: invalid UTF-8, 0 samples/channels, scale not finite > 0) -- the
 * same codes firmware_bridge.messages.decode_message raises, i.e. the ERROR code to answer with.
 * Variable parts are NOT copied: the pointers reference the payload passed in.
 * Encoders write the payload into out and return its size, or a negative value (EDGEFL_E_*).
 */
typedef struct {
    uint8_t proto_version;
    uint16_t sensor_rate_hz;
    uint32_t free_ram;
    uint32_t arena_size;
    uint8_t board_len;
    const char *board; /* utf-8, not NUL-terminated */
} edgefl_hello_t;

typedef struct {
    uint32_t window_id;
    uint16_t n_samples;
    uint8_t n_channels;
    int8_t label; /* -1 = none */
    float scale;  /* physical units per LSB */
    /* encode: samples (native int16, sample-major) if non-NULL, else samples_le.
     * decode: samples = NULL, samples_le -> the little-endian i16 array in the payload;
     *         read element i with edgefl_sensor_sample(). */
    const int16_t *samples;
    const uint8_t *samples_le;
} edgefl_sensor_window_t;
#define EDGEFL_SENSOR_WINDOW_HDR 12u
#define EDGEFL_SENSOR_WINDOW_MAX_VALUES ((EDGEFL_MAX_PAYLOAD - EDGEFL_SENSOR_WINDOW_HDR) / 2u)
int16_t edgefl_sensor_sample(const edgefl_sensor_window_t *w, size_t i);

typedef struct {
    uint32_t head_id;
    uint32_t total_len;
    uint16_t n_chunks;
    uint32_t head_crc32;
} edgefl_head_begin_t;

typedef struct {
    uint32_t head_id;
    uint16_t index;
    uint16_t data_len; /* 1..1024 */
    const uint8_t *data;
} edgefl_head_chunk_t;

typedef struct {
    uint32_t head_id;
} edgefl_head_commit_t;

typedef struct {
    uint8_t acked_type;
    uint16_t acked_seq;
    uint8_t status; /* 0 = ok, else an error code */
    uint16_t index; /* HEAD_CHUNK index, else 0 */
} edgefl_ack_t;

typedef struct {
    uint32_t window_id;
    uint8_t class_id;
    float score;
    uint32_t head_id;
} edgefl_infer_result_t;

typedef struct {
    uint32_t uptime_ms;
} edgefl_heartbeat_t;

typedef struct {
    uint8_t code;
    uint8_t detail_len;
    const char *detail; /* utf-8, not NUL-terminated */
} edgefl_error_t;

int edgefl_decode_hello(const uint8_t *p, size_t len, edgefl_hello_t *out);
int edgefl_decode_sensor_window(const uint8_t *p, size_t len, edgefl_sensor_window_t *out);
int edgefl_decode_head_begin(const uint8_t *p, size_t len, edgefl_head_begin_t *out);
int edgefl_decode_head_chunk(const uint8_t *p, size_t len, edgefl_head_chunk_t *out);
int edgefl_decode_head_commit(const uint8_t *p, size_t len, edgefl_head_commit_t *out);
int edgefl_decode_ack(const uint8_t *p, size_t len, edgefl_ack_t *out);
int edgefl_decode_infer_result(const uint8_t *p, size_t len, edgefl_infer_result_t *out);
int edgefl_decode_heartbeat(const uint8_t *p, size_t len, edgefl_heartbeat_t *out);
int edgefl_decode_error(const uint8_t *p, size_t len, edgefl_error_t *out);

long edgefl_encode_hello(const edgefl_hello_t *m, uint8_t *out, size_t cap);
long edgefl_encode_sensor_window(const edgefl_sensor_window_t *m, uint8_t *out, size_t cap);
long edgefl_encode_head_begin(const edgefl_head_begin_t *m, uint8_t *out, size_t cap);
long edgefl_encode_head_chunk(const edgefl_head_chunk_t *m, uint8_t *out, size_t cap);
long edgefl_encode_head_commit(const edgefl_head_commit_t *m, uint8_t *out, size_t cap);
long edgefl_encode_ack(const edgefl_ack_t *m, uint8_t *out, size_t cap);
long edgefl_encode_infer_result(const edgefl_infer_result_t *m, uint8_t *out, size_t cap);
long edgefl_encode_heartbeat(const edgefl_heartbeat_t *m, uint8_t *out, size_t cap);
long edgefl_encode_error(const edgefl_error_t *m, uint8_t *out, size_t cap);

/* A decoded message of any type. */
typedef struct {
    uint8_t type;
    union {
        edgefl_hello_t hello;
        edgefl_sensor_window_t sensor_window;
        edgefl_head_begin_t head_begin;
        edgefl_head_chunk_t head_chunk;
        edgefl_head_commit_t head_commit;
        edgefl_ack_t ack;
        edgefl_infer_result_t infer_result;
        edgefl_heartbeat_t heartbeat;
        edgefl_error_t error;
    } u;
} edgefl_msg_t;
/* Returns EDGEFL_OK, EDGEFL_ERR_UNKNOWN_TYPE, EDGEFL_ERR_BAD_LENGTH or EDGEFL_ERR_BAD_MESSAGE. */
int edgefl_decode_message(uint8_t type, const uint8_t *p, size_t len, edgefl_msg_t *out);
/* Encodes m->u per m->type into a payload; negative on error. */
long edgefl_encode_message(const edgefl_msg_t *m, uint8_t *out, size_t cap);
/* Payload then frame in one go: returns the wire size or a negative value. */
long edgefl_encode_message_frame(const edgefl_msg_t *m, uint16_t seq, uint8_t *out, size_t cap);

/* ---- int8 head inference (head blob) -----------------------------------------------------------
 * Blob: "EFHD", version u8 = 1, n_layers u8, embedding_dim u16, mean f32[dim], std f32[dim], then per
 * layer: in u16, out u16, relu u8, weights i8[in*out] (row-major in x out), scales f32[out], bias f32[out].
 * Bit-for-bit the same arithmetic as edge_agent.learning.head.Int8Head on float32 (round half to even,
 * int32 accumulate, y = ((float)acc * x_scale) * w_scale + bias).
 */
typedef struct {
    uint8_t n_layers;
    uint16_t embedding_dim;
    uint16_t n_classes; /* out of the last layer */
    uint16_t max_width; /* widest layer input/output */
} edgefl_head_info_t;
/* Floats of scratch edgefl_head_predict needs for a head whose widest layer is `width`. */
#define EDGEFL_HEAD_SCRATCH_FLOATS(width) (2u * (width) + ((width) + 3u) / 4u)
/* Checks the structure and exact size of a blob and its values: every float (mean, std, scales, bias)
 * finite, std > 0 and scales > 0 (as head_blob.decode_head). Returns EDGEFL_OK or
 * EDGEFL_ERR_BAD_MESSAGE. */
int edgefl_head_validate(const uint8_t *blob, size_t len, edgefl_head_info_t *info);
/* The same check; *why (if non-NULL) gets a short static text naming what is wrong ("" when valid). */
int edgefl_head_check(const uint8_t *blob, size_t len, edgefl_head_info_t *info, const char **why);
/* Runs the head on one embedding (embedding_dim floats, not standardized: the blob's mean/std are
 * applied). scratch: EDGEFL_HEAD_SCRATCH_FLOATS(info.max_width) floats. Returns the argmax class
 * (>= 0; ties -> lowest index), or -EDGEFL_ERR_BAD_MESSAGE / -EDGEFL_ERR_OUT_OF_MEMORY (scratch too
 * small). logits_out (n_classes floats) and score_out (softmax probability of the class) may be NULL. */
int edgefl_head_predict(const uint8_t *blob, size_t len, const float *embedding, float *scratch,
                        size_t scratch_floats, float *logits_out, float *score_out);
/* exp() without <math.h> (relative error < 2e-7 on [-87, 88]); used for the softmax score. */
float edgefl_expf(float x);

/* ---- head push receiver ------------------------------------------------------------------------
 * Two EDGEFL_HEAD_MAX_LEN buffers: the active head and the staging area. HEAD_BEGIN (re)starts
 * staging, HEAD_CHUNKs fill it (offset = index * chunk size: every chunk but the last has the same
 * size, the last one holds the rest; the first chunk to arrive fixes the size, a chunk of another
 * length is refused BAD_LENGTH), HEAD_COMMIT swaps the buffers only if every chunk arrived, the
 * CRC-32 of the staged bytes equals head_crc32 and the blob is a valid head that fits the device;
 * otherwise the previous head stays active. A COMMIT with chunks missing keeps the staging (the
 * agent may resend them and commit again); any other refused COMMIT ends the push.
 * PROTOCOL.md, "Head push", and the conformance scenarios in conformance/mcu.txt.
 */
typedef struct {
    uint8_t bufs[2][EDGEFL_HEAD_MAX_LEN];
    uint8_t active_buf; /* index of the active head's buffer */
    uint8_t has_head;
    uint32_t head_id;
    uint32_t head_len;
    edgefl_head_info_t info;
    /* staging */
    uint8_t staging;
    uint32_t st_id;
    uint32_t st_total;
    uint16_t st_n_chunks;
    uint32_t st_crc;
    uint32_t st_chunk_size; /* 0 until the first chunk fixes it */
    uint16_t st_received;
    uint8_t st_have[(EDGEFL_HEAD_MAX_CHUNKS + 7u) / 8u];
} edgefl_head_rx_t;

/* What to answer: an ACK (code == 0) or an ERROR with `code`. */
typedef struct {
    uint8_t type;   /* EDGEFL_MSG_ACK or EDGEFL_MSG_ERROR */
    uint8_t code;   /* 0 for ACK */
    uint16_t index; /* ACK.index: the chunk index for HEAD_CHUNK, else 0 */
    const char *detail; /* short static text for ERROR.detail (NUL-terminated) */
} edgefl_head_reply_t;

void edgefl_head_rx_init(edgefl_head_rx_t *rx);
void edgefl_head_rx_begin(edgefl_head_rx_t *rx, const edgefl_head_begin_t *m, edgefl_head_reply_t *reply);
void edgefl_head_rx_chunk(edgefl_head_rx_t *rx, const edgefl_head_chunk_t *m, edgefl_head_reply_t *reply);
void edgefl_head_rx_commit(edgefl_head_rx_t *rx, const edgefl_head_commit_t *m, edgefl_head_reply_t *reply);
/* The active head blob (NULL if none yet); *len gets its size. */
const uint8_t *edgefl_head_rx_active(const edgefl_head_rx_t *rx, uint32_t *len);

/* ---- device dispatcher -------------------------------------------------------------------------
 * Everything an MCU does with incoming frames (conformance/mcu.txt is the executable definition):
 * answers HELLO (with its own HELLO; ERROR BAD_VERSION if the agent's proto_version differs),
 * HEARTBEAT (with a HEARTBEAT carrying its uptime), the head push (ACK / ERROR), and sends ERROR
 * BAD_VERSION / UNKNOWN_TYPE / BAD_LENGTH / BAD_MESSAGE for frames it cannot take -- never for a
 * frame of type ERROR, and at most EDGEFL_ERROR_REPLY_BURST back to back, EDGEFL_ERROR_REPLY_RATE
 * per second. ACK, ERROR, SENSOR_WINDOW and INFER_RESULT are not answered (msg_out gets them).
 * Replies are written as complete wire frames into tx (EDGEFL_MAX_FRAME bytes are always enough).
 */
typedef struct {
    edgefl_decoder_t dec;
    edgefl_head_rx_t head;
    uint16_t tx_seq;
    /* filled by the application */
    uint16_t sensor_rate_hz;
    uint32_t free_ram;
    uint32_t arena_size;
    const char *board; /* NUL-terminated */
    uint32_t uptime_ms; /* the now_ms of the last edgefl_device_feed: what HEARTBEAT replies carry */
    /* ERROR-reply token bucket, in thousandths of a reply (integer math, exact for whole ms) */
    uint32_t err_tokens;
    uint32_t err_last_ms;
    uint32_t errors_suppressed; /* ERROR replies not sent: over the rate */
    uint32_t errors_unanswered; /* rejected frames that were themselves ERRORs: never answered */
} edgefl_device_t;

void edgefl_device_init(edgefl_device_t *dev, const char *board, uint16_t sensor_rate_hz, uint32_t free_ram,
                        uint32_t arena_size);
/* Feed one received byte; now_ms is the device's millisecond clock (e.g. millis(); wraps at 2^32),
 * used for HEARTBEAT replies and the ERROR-reply rate. When the byte completes a frame that needs an
 * answer, the reply frame is written to tx and its size returned (0 = nothing to send, negative = tx
 * too small). If msg_out is non-NULL and the frame was a valid message, it is decoded there and
 * *msg_seq set (for the application: e.g. SENSOR_WINDOW from a simulator, ACKs); else msg_out->type
 * is 0. */
long edgefl_device_feed(edgefl_device_t *dev, uint8_t byte, uint32_t now_ms, uint8_t *tx, size_t tx_cap,
                        edgefl_msg_t *msg_out, uint16_t *msg_seq);
/* Encode an outgoing message with the device's next sequence number. */
long edgefl_device_send(edgefl_device_t *dev, const edgefl_msg_t *m, uint8_t *tx, size_t tx_cap);

#ifdef __cplusplus
}
#endif
#endif /* EDGEFL_PROTO_H */
