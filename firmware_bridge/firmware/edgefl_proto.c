/* edgefl_proto: the edge-fl serial protocol, version 1, in portable C99. See edgefl_proto.h. */
#include "edgefl_proto.h"

#include <string.h>

/* ==== little-endian helpers ======================================================================= */
uint16_t edgefl_rd_u16(const uint8_t *p) { return (uint16_t)((uint16_t)p[0] | (uint16_t)((uint16_t)p[1] << 8)); }

uint32_t edgefl_rd_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

int16_t edgefl_rd_i16(const uint8_t *p)
{
    uint16_t u = edgefl_rd_u16(p);
    return (int16_t)(u < 0x8000u ? (int32_t)u : (int32_t)u - 65536L);
}

float edgefl_rd_f32(const uint8_t *p)
{
    uint32_t u = edgefl_rd_u32(p);
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

void edgefl_wr_u16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v & 0xFFu);
    p[1] = (uint8_t)((v >> 8) & 0xFFu);
}

void edgefl_wr_u32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v & 0xFFu);
    p[1] = (uint8_t)((v >> 8) & 0xFFu);
    p[2] = (uint8_t)((v >> 16) & 0xFFu);
    p[3] = (uint8_t)((v >> 24) & 0xFFu);
}

void edgefl_wr_i16(uint8_t *p, int16_t v) { edgefl_wr_u16(p, (uint16_t)((int32_t)v & 0xFFFF)); }

void edgefl_wr_f32(uint8_t *p, float v)
{
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    edgefl_wr_u32(p, u);
}

static int8_t rd_i8(uint8_t b) { return (int8_t)(b < 128u ? (int)b : (int)b - 256); }

/* ==== CRCs (bitwise: no tables, a few hundred bytes of code) ====================================== */
uint16_t edgefl_crc16(uint16_t crc, const uint8_t *data, size_t len)
{
    size_t i;
    int b;
    for (i = 0; i < len; i++) {
        crc = (uint16_t)(crc ^ (uint16_t)((uint16_t)data[i] << 8));
        for (b = 0; b < 8; b++) {
            if (crc & 0x8000u)
                crc = (uint16_t)((uint16_t)(crc << 1) ^ 0x1021u);
            else
                crc = (uint16_t)(crc << 1);
        }
    }
    return crc;
}

uint32_t edgefl_crc32(uint32_t crc, const uint8_t *data, size_t len)
{
    size_t i;
    int b;
    crc = ~crc;
    for (i = 0; i < len; i++) {
        crc ^= (uint32_t)data[i];
        for (b = 0; b < 8; b++)
            crc = (crc & 1u) ? ((crc >> 1) ^ 0xEDB88320UL) : (crc >> 1);
    }
    return ~crc;
}

/* ==== COBS ========================================================================================== */
long edgefl_cobs_encode(const uint8_t *in, size_t len, uint8_t *out, size_t out_cap)
{
    size_t i, code_idx = 0, o = 1;
    uint8_t code = 1;
    if (out_cap < 1)
        return EDGEFL_E_NOSPACE;
    for (i = 0; i < len; i++) {
        if (in[i] == 0) {
            out[code_idx] = code;
            if (o >= out_cap)
                return EDGEFL_E_NOSPACE;
            code_idx = o++;
            code = 1;
        } else {
            if (o >= out_cap)
                return EDGEFL_E_NOSPACE;
            out[o++] = in[i];
            code++;
            /* A full block starts a new one only if more input follows (canonical COBS, no trailing 0x01). */
            if (code == 0xFFu && i + 1 < len) {
                out[code_idx] = code;
                if (o >= out_cap)
                    return EDGEFL_E_NOSPACE;
                code_idx = o++;
                code = 1;
            }
        }
    }
    out[code_idx] = code;
    return (long)o;
}

long edgefl_cobs_decode(const uint8_t *in, size_t len, uint8_t *out, size_t out_cap)
{
    size_t i = 0, o = 0;
    while (i < len) {
        uint8_t code = in[i++];
        uint8_t k;
        if (code == 0)
            return -1;
        for (k = 1; k < code; k++) {
            if (i >= len || in[i] == 0 || o >= out_cap)
                return -1;
            out[o++] = in[i++];
        }
        if (code != 0xFFu && i < len) {
            if (o >= out_cap)
                return -1;
            out[o++] = 0;
        }
    }
    return (long)o;
}

/* ==== frames ======================================================================================== */
long edgefl_frame_encode_v(uint8_t version, uint8_t type, uint16_t seq, const uint8_t *payload, size_t len,
                           uint8_t *out, size_t out_cap)
{
    /* The body is COBS-encoded in one pass from three pieces (header, payload, CRC) without copying the
     * payload: a tiny streaming encoder over a virtual concatenation. */
    uint8_t hdr[EDGEFL_HEADER_LEN], crc[4];
    size_t crc_len, total, i, code_idx = 0, o = 1;
    uint8_t code = 1;
    if (len > EDGEFL_MAX_PAYLOAD || (len && !payload) || !out)
        return EDGEFL_E_ARG;
    hdr[0] = version;
    hdr[1] = type;
    edgefl_wr_u16(hdr + 2, seq);
    edgefl_wr_u16(hdr + 4, (uint16_t)len);
    hdr[6] = len > EDGEFL_CRC16_MAX_PAYLOAD ? EDGEFL_FLAG_CRC32 : 0u;
    hdr[7] = 0;
    if (len > EDGEFL_CRC16_MAX_PAYLOAD) {
        uint32_t c = edgefl_crc32(EDGEFL_CRC32_INIT, hdr, sizeof hdr);
        c = edgefl_crc32(c, payload, len);
        edgefl_wr_u32(crc, c);
        crc_len = 4;
    } else {
        uint16_t c = edgefl_crc16(EDGEFL_CRC16_INIT, hdr, sizeof hdr);
        c = edgefl_crc16(c, payload, len);
        edgefl_wr_u16(crc, c);
        crc_len = 2;
    }
    total = EDGEFL_HEADER_LEN + len + crc_len;
    if (out_cap < 2)
        return EDGEFL_E_NOSPACE;
    for (i = 0; i < total; i++) {
        uint8_t b = i < EDGEFL_HEADER_LEN ? hdr[i]
                    : i < EDGEFL_HEADER_LEN + len ? payload[i - EDGEFL_HEADER_LEN]
                                                  : crc[i - EDGEFL_HEADER_LEN - len];
        if (b == 0) {
            out[code_idx] = code;
            if (o >= out_cap)
                return EDGEFL_E_NOSPACE;
            code_idx = o++;
            code = 1;
        } else {
            if (o >= out_cap)
                return EDGEFL_E_NOSPACE;
            out[o++] = b;
            code++;
            if (code == 0xFFu && i + 1 < total) {
                out[code_idx] = code;
                if (o >= out_cap)
                    return EDGEFL_E_NOSPACE;
                code_idx = o++;
                code = 1;
            }
        }
    }
    out[code_idx] = code;
    if (o >= out_cap)
        return EDGEFL_E_NOSPACE;
    out[o++] = 0;
    return (long)o;
}

long edgefl_frame_encode(uint8_t type, uint16_t seq, const uint8_t *payload, size_t len, uint8_t *out,
                         size_t out_cap)
{
    return edgefl_frame_encode_v(EDGEFL_PROTO_VERSION, type, seq, payload, len, out, out_cap);
}

void edgefl_decoder_init(edgefl_decoder_t *dec) { memset(dec, 0, sizeof *dec); }

/* Validates a complete COBS run (without the delimiter) sitting in dec->buf. The checks run in the
 * same order as firmware_bridge/framing.py (decode_body) so both sides count a bad frame alike:
 * size for a CRC, CRC (its size from flag bit 0, its place the end of the body), reserved byte,
 * unknown flags, length field vs body, payload limit, CRC kind vs length. */
static int decoder_finish(edgefl_decoder_t *dec, edgefl_frame_t *f)
{
    long n = edgefl_cobs_decode(dec->buf, dec->len, dec->buf, sizeof dec->buf);
    size_t body, length, crc_len, covered;
    uint8_t flags;
    const uint8_t *b = dec->buf;
    if (n < 0) {
        dec->stats.bad_cobs++;
        return EDGEFL_FEED_NONE;
    }
    body = (size_t)n;
    if (body < EDGEFL_HEADER_LEN + 2u) {
        dec->stats.bad_length++;
        return EDGEFL_FEED_NONE;
    }
    length = edgefl_rd_u16(b + 4);
    flags = b[6];
    crc_len = (flags & EDGEFL_FLAG_CRC32) ? 4u : 2u;
    if (body < EDGEFL_HEADER_LEN + crc_len) {
        dec->stats.bad_length++;
        return EDGEFL_FEED_NONE;
    }
    covered = body - crc_len;
    if (crc_len == 4u ? edgefl_crc32(EDGEFL_CRC32_INIT, b, covered) != edgefl_rd_u32(b + covered)
                      : edgefl_crc16(EDGEFL_CRC16_INIT, b, covered) != edgefl_rd_u16(b + covered)) {
        dec->stats.bad_crc++;
        return EDGEFL_FEED_NONE;
    }
    if (b[7] != 0 || (flags & (uint8_t)~EDGEFL_FLAG_CRC32) != 0) {
        dec->stats.bad_header++;
        return EDGEFL_FEED_NONE;
    }
    if (length != covered - EDGEFL_HEADER_LEN || length > EDGEFL_MAX_PAYLOAD) {
        dec->stats.bad_length++;
        return EDGEFL_FEED_NONE;
    }
    if ((crc_len == 4u) != (length > EDGEFL_CRC16_MAX_PAYLOAD)) {
        dec->stats.bad_header++;
        return EDGEFL_FEED_NONE;
    }
    f->version = b[0];
    f->type = b[1];
    f->seq = edgefl_rd_u16(b + 2);
    f->length = (uint16_t)length;
    f->payload = b + EDGEFL_HEADER_LEN;
    dec->stats.frames++;
    if (b[0] != EDGEFL_PROTO_VERSION) {
        dec->stats.version_mismatches++;
        return EDGEFL_FEED_BAD_VERSION;
    }
    return EDGEFL_FEED_FRAME;
}

int edgefl_decoder_feed(edgefl_decoder_t *dec, uint8_t byte, edgefl_frame_t *frame_out)
{
    if (byte == 0) {
        int r = EDGEFL_FEED_NONE;
        if (!dec->overrun && dec->len > 0)
            r = decoder_finish(dec, frame_out);
        dec->len = 0;
        dec->overrun = 0;
        return r;
    }
    if (dec->overrun)
        return EDGEFL_FEED_NONE;
    if (dec->len >= sizeof dec->buf) {
        dec->overrun = 1;
        dec->stats.overruns++;
        dec->len = 0;
        return EDGEFL_FEED_NONE;
    }
    dec->buf[dec->len++] = byte;
    return EDGEFL_FEED_NONE;
}

/* ==== messages ====================================================================================== */
/* Strict UTF-8 (as Python's bytes.decode): no overlongs, no surrogates, nothing above U+10FFFF. */
static int utf8_valid(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        size_t k, more;
        uint8_t lo = 0x80u, hi = 0xBFu;
        if (c < 0x80u) {
            i++;
            continue;
        }
        if (c >= 0xC2u && c <= 0xDFu)
            more = 1;
        else if (c >= 0xE0u && c <= 0xEFu) {
            more = 2;
            if (c == 0xE0u)
                lo = 0xA0u;
            else if (c == 0xEDu)
                hi = 0x9Fu;
        } else if (c >= 0xF0u && c <= 0xF4u) {
            more = 3;
            if (c == 0xF0u)
                lo = 0x90u;
            else if (c == 0xF4u)
                hi = 0x8Fu;
        } else
            return 0;
        if (n - i <= more)
            return 0;
        for (k = 1; k <= more; k++) {
            uint8_t d = s[i + k];
            if (d < (k == 1 ? lo : 0x80u) || d > (k == 1 ? hi : 0xBFu))
                return 0;
        }
        i += more + 1u;
    }
    return 1;
}

static int f32_finite_positive(const uint8_t *p)
{
    uint32_t u = edgefl_rd_u32(p);
    return (u & 0x80000000UL) == 0u && (u & 0x7F800000UL) != 0x7F800000UL && u != 0u;
}
int edgefl_decode_hello(const uint8_t *p, size_t len, edgefl_hello_t *out)
{
    if (len < 12u || len != 12u + (size_t)p[11])
        return EDGEFL_ERR_BAD_LENGTH;
    out->proto_version = p[0];
    out->sensor_rate_hz = edgefl_rd_u16(p + 1);
    out->free_ram = edgefl_rd_u32(p + 3);
    out->arena_size = edgefl_rd_u32(p + 7);
    out->board_len = p[11];
    out->board = (const char *)(p + 12);
    return utf8_valid(p + 12, p[11]) ? EDGEFL_OK : EDGEFL_ERR_BAD_MESSAGE;
}

long edgefl_encode_hello(const edgefl_hello_t *m, uint8_t *out, size_t cap)
{
    size_t n = 12u + m->board_len;
    if (m->board_len && !m->board)
        return EDGEFL_E_ARG;
    if (cap < n)
        return EDGEFL_E_NOSPACE;
    out[0] = m->proto_version;
    edgefl_wr_u16(out + 1, m->sensor_rate_hz);
    edgefl_wr_u32(out + 3, m->free_ram);
    edgefl_wr_u32(out + 7, m->arena_size);
    out[11] = m->board_len;
    if (m->board_len)
        memcpy(out + 12, m->board, m->board_len);
    return (long)n;
}

int16_t edgefl_sensor_sample(const edgefl_sensor_window_t *w, size_t i)
{
    return w->samples ? w->samples[i] : edgefl_rd_i16(w->samples_le + 2u * i);
}

int edgefl_decode_sensor_window(const uint8_t *p, size_t len, edgefl_sensor_window_t *out)
{
    uint32_t values;
    if (len < EDGEFL_SENSOR_WINDOW_HDR)
        return EDGEFL_ERR_BAD_LENGTH;
    out->window_id = edgefl_rd_u32(p);
    out->n_samples = edgefl_rd_u16(p + 4);
    out->n_channels = p[6];
    out->label = rd_i8(p[7]);
    out->scale = edgefl_rd_f32(p + 8);
    values = (uint32_t)out->n_samples * (uint32_t)out->n_channels;
    if ((uint32_t)(len - EDGEFL_SENSOR_WINDOW_HDR) != 2u * values)
        return EDGEFL_ERR_BAD_LENGTH;
    out->samples = NULL;
    out->samples_le = p + EDGEFL_SENSOR_WINDOW_HDR;
    /* contents the Python side refuses too: no samples, no channels, scale not finite and > 0 */
    if (out->n_samples == 0u || out->n_channels == 0u || !f32_finite_positive(p + 8))
        return EDGEFL_ERR_BAD_MESSAGE;
    return EDGEFL_OK;
}

long edgefl_encode_sensor_window(const edgefl_sensor_window_t *m, uint8_t *out, size_t cap)
{
    uint32_t values = (uint32_t)m->n_samples * (uint32_t)m->n_channels, i;
    size_t n;
    if (values > EDGEFL_SENSOR_WINDOW_MAX_VALUES || (values && !m->samples && !m->samples_le))
        return EDGEFL_E_ARG;
    n = EDGEFL_SENSOR_WINDOW_HDR + 2u * (size_t)values;
    if (cap < n)
        return EDGEFL_E_NOSPACE;
    edgefl_wr_u32(out, m->window_id);
    edgefl_wr_u16(out + 4, m->n_samples);
    out[6] = m->n_channels;
    out[7] = (uint8_t)((int)m->label & 0xFF);
    edgefl_wr_f32(out + 8, m->scale);
    if (m->samples) {
        for (i = 0; i < values; i++)
            edgefl_wr_i16(out + EDGEFL_SENSOR_WINDOW_HDR + 2u * i, m->samples[i]);
    } else if (values) {
        memcpy(out + EDGEFL_SENSOR_WINDOW_HDR, m->samples_le, 2u * (size_t)values);
    }
    return (long)n;
}

int edgefl_decode_head_begin(const uint8_t *p, size_t len, edgefl_head_begin_t *out)
{
    if (len != 14u)
        return EDGEFL_ERR_BAD_LENGTH;
    out->head_id = edgefl_rd_u32(p);
    out->total_len = edgefl_rd_u32(p + 4);
    out->n_chunks = edgefl_rd_u16(p + 8);
    out->head_crc32 = edgefl_rd_u32(p + 10);
    return EDGEFL_OK;
}

long edgefl_encode_head_begin(const edgefl_head_begin_t *m, uint8_t *out, size_t cap)
{
    if (cap < 14u)
        return EDGEFL_E_NOSPACE;
    edgefl_wr_u32(out, m->head_id);
    edgefl_wr_u32(out + 4, m->total_len);
    edgefl_wr_u16(out + 8, m->n_chunks);
    edgefl_wr_u32(out + 10, m->head_crc32);
    return 14;
}

int edgefl_decode_head_chunk(const uint8_t *p, size_t len, edgefl_head_chunk_t *out)
{
    if (len < 7u || len > 6u + EDGEFL_MAX_CHUNK_DATA)
        return EDGEFL_ERR_BAD_LENGTH;
    out->head_id = edgefl_rd_u32(p);
    out->index = edgefl_rd_u16(p + 4);
    out->data_len = (uint16_t)(len - 6u);
    out->data = p + 6;
    return EDGEFL_OK;
}

long edgefl_encode_head_chunk(const edgefl_head_chunk_t *m, uint8_t *out, size_t cap)
{
    size_t n = 6u + m->data_len;
    if (m->data_len < 1u || m->data_len > EDGEFL_MAX_CHUNK_DATA || !m->data)
        return EDGEFL_E_ARG;
    if (cap < n)
        return EDGEFL_E_NOSPACE;
    edgefl_wr_u32(out, m->head_id);
    edgefl_wr_u16(out + 4, m->index);
    memcpy(out + 6, m->data, m->data_len);
    return (long)n;
}

int edgefl_decode_head_commit(const uint8_t *p, size_t len, edgefl_head_commit_t *out)
{
    if (len != 4u)
        return EDGEFL_ERR_BAD_LENGTH;
    out->head_id = edgefl_rd_u32(p);
    return EDGEFL_OK;
}

long edgefl_encode_head_commit(const edgefl_head_commit_t *m, uint8_t *out, size_t cap)
{
    if (cap < 4u)
        return EDGEFL_E_NOSPACE;
    edgefl_wr_u32(out, m->head_id);
    return 4;
}

int edgefl_decode_ack(const uint8_t *p, size_t len, edgefl_ack_t *out)
{
    if (len != 6u)
        return EDGEFL_ERR_BAD_LENGTH;
    out->acked_type = p[0];
    out->acked_seq = edgefl_rd_u16(p + 1);
    out->status = p[3];
    out->index = edgefl_rd_u16(p + 4);
    return EDGEFL_OK;
}

long edgefl_encode_ack(const edgefl_ack_t *m, uint8_t *out, size_t cap)
{
    if (cap < 6u)
        return EDGEFL_E_NOSPACE;
    out[0] = m->acked_type;
    edgefl_wr_u16(out + 1, m->acked_seq);
    out[3] = m->status;
    edgefl_wr_u16(out + 4, m->index);
    return 6;
}

int edgefl_decode_infer_result(const uint8_t *p, size_t len, edgefl_infer_result_t *out)
{
    if (len != 13u)
        return EDGEFL_ERR_BAD_LENGTH;
    out->window_id = edgefl_rd_u32(p);
    out->class_id = p[4];
    out->score = edgefl_rd_f32(p + 5);
    out->head_id = edgefl_rd_u32(p + 9);
    return EDGEFL_OK;
}

long edgefl_encode_infer_result(const edgefl_infer_result_t *m, uint8_t *out, size_t cap)
{
    if (cap < 13u)
        return EDGEFL_E_NOSPACE;
    edgefl_wr_u32(out, m->window_id);
    out[4] = m->class_id;
    edgefl_wr_f32(out + 5, m->score);
    edgefl_wr_u32(out + 9, m->head_id);
    return 13;
}

int edgefl_decode_heartbeat(const uint8_t *p, size_t len, edgefl_heartbeat_t *out)
{
    if (len != 4u)
        return EDGEFL_ERR_BAD_LENGTH;
    out->uptime_ms = edgefl_rd_u32(p);
    return EDGEFL_OK;
}

long edgefl_encode_heartbeat(const edgefl_heartbeat_t *m, uint8_t *out, size_t cap)
{
    if (cap < 4u)
        return EDGEFL_E_NOSPACE;
    edgefl_wr_u32(out, m->uptime_ms);
    return 4;
}

int edgefl_decode_error(const uint8_t *p, size_t len, edgefl_error_t *out)
{
    if (len < 2u || len != 2u + (size_t)p[1])
        return EDGEFL_ERR_BAD_LENGTH;
    out->code = p[0];
    out->detail_len = p[1];
    out->detail = (const char *)(p + 2);
    return utf8_valid(p + 2, p[1]) ? EDGEFL_OK : EDGEFL_ERR_BAD_MESSAGE;
}

long edgefl_encode_error(const edgefl_error_t *m, uint8_t *out, size_t cap)
{
    size_t n = 2u + m->detail_len;
    if (m->detail_len && !m->detail)
        return EDGEFL_E_ARG;
    if (cap < n)
        return EDGEFL_E_NOSPACE;
    out[0] = m->code;
    out[1] = m->detail_len;
    if (m->detail_len)
        memcpy(out + 2, m->detail, m->detail_len);
    return (long)n;
}

int edgefl_decode_message(uint8_t type, const uint8_t *p, size_t len, edgefl_msg_t *out)
{
    out->type = type;
    switch (type) {
    case EDGEFL_MSG_HELLO: return edgefl_decode_hello(p, len, &out->u.hello);
    case EDGEFL_MSG_SENSOR_WINDOW: return edgefl_decode_sensor_window(p, len, &out->u.sensor_window);
    case EDGEFL_MSG_HEAD_BEGIN: return edgefl_decode_head_begin(p, len, &out->u.head_begin);
    case EDGEFL_MSG_HEAD_CHUNK: return edgefl_decode_head_chunk(p, len, &out->u.head_chunk);
    case EDGEFL_MSG_HEAD_COMMIT: return edgefl_decode_head_commit(p, len, &out->u.head_commit);
    case EDGEFL_MSG_ACK: return edgefl_decode_ack(p, len, &out->u.ack);
    case EDGEFL_MSG_INFER_RESULT: return edgefl_decode_infer_result(p, len, &out->u.infer_result);
    case EDGEFL_MSG_HEARTBEAT: return edgefl_decode_heartbeat(p, len, &out->u.heartbeat);
    case EDGEFL_MSG_ERROR: return edgefl_decode_error(p, len, &out->u.error);
    default: return EDGEFL_ERR_UNKNOWN_TYPE;
    }
}

long edgefl_encode_message(const edgefl_msg_t *m, uint8_t *out, size_t cap)
{
    switch (m->type) {
    case EDGEFL_MSG_HELLO: return edgefl_encode_hello(&m->u.hello, out, cap);
    case EDGEFL_MSG_SENSOR_WINDOW: return edgefl_encode_sensor_window(&m->u.sensor_window, out, cap);
    case EDGEFL_MSG_HEAD_BEGIN: return edgefl_encode_head_begin(&m->u.head_begin, out, cap);
    case EDGEFL_MSG_HEAD_CHUNK: return edgefl_encode_head_chunk(&m->u.head_chunk, out, cap);
    case EDGEFL_MSG_HEAD_COMMIT: return edgefl_encode_head_commit(&m->u.head_commit, out, cap);
    case EDGEFL_MSG_ACK: return edgefl_encode_ack(&m->u.ack, out, cap);
    case EDGEFL_MSG_INFER_RESULT: return edgefl_encode_infer_result(&m->u.infer_result, out, cap);
    case EDGEFL_MSG_HEARTBEAT: return edgefl_encode_heartbeat(&m->u.heartbeat, out, cap);
    case EDGEFL_MSG_ERROR: return edgefl_encode_error(&m->u.error, out, cap);
    default: return EDGEFL_E_ARG;
    }
}

long edgefl_encode_message_frame(const edgefl_msg_t *m, uint16_t seq, uint8_t *out, size_t cap)
{
    /* The payload is built at the end of `out`, then the frame is encoded in front of it; COBS output
     * can overtake its input, so copy when they would overlap. */
    static uint8_t payload[EDGEFL_MAX_PAYLOAD]; /* one static scratch: not re-entrant */
    long n = edgefl_encode_message(m, payload, sizeof payload);
    if (n < 0)
        return n;
    return edgefl_frame_encode(m->type, seq, payload, (size_t)n, out, cap);
}

/* ==== int8 head ===================================================================================== */
#define HEAD_HDR 8u
#define QMAX 127
#define MIN_SCALE 1e-8f

/* Finite (not Inf/NaN) by the bit pattern: no <math.h> needed. */
static int f32_finite(const uint8_t *p) { return (edgefl_rd_u32(p) & 0x7F800000ul) != 0x7F800000ul; }

/* n floats at p are all finite, and all > 0 if `positive`. */
static int f32_all_ok(const uint8_t *p, uint32_t n, int positive)
{
    uint32_t i;
    for (i = 0; i < n; i++, p += 4) {
        if (!f32_finite(p) || (positive && !(edgefl_rd_f32(p) > 0.0f)))
            return 0;
    }
    return 1;
}

static int head_bad(const char **why, const char *text)
{
    if (why)
        *why = text;
    return EDGEFL_ERR_BAD_MESSAGE;
}

int edgefl_head_check(const uint8_t *blob, size_t len, edgefl_head_info_t *info, const char **why)
{
    /* 32-bit offsets: size_t may be 16-bit (AVR), where in * out could wrap. */
    uint32_t off, dim, blen = len > 0xFFFFFFFFul ? 0xFFFFFFFFul : (uint32_t)len;
    unsigned l, n_layers;
    uint32_t prev;
    edgefl_head_info_t tmp;
    if (!info)
        info = &tmp;
    if (why)
        *why = "";
    if (!blob || blen < HEAD_HDR || memcmp(blob, "EFHD", 4) != 0 || blob[4] != 1u || blob[5] == 0u)
        return head_bad(why, "not a head blob: magic, version or n_layers");
    n_layers = blob[5];
    dim = edgefl_rd_u16(blob + 6);
    if (dim == 0u)
        return head_bad(why, "embedding_dim is 0");
    if (n_layers > EDGEFL_HEAD_MAX_LAYERS)
        return head_bad(why, "more layers than EDGEFL_HEAD_MAX_LAYERS");
    off = (uint32_t)HEAD_HDR + (uint32_t)8u * dim;
    if (off > blen)
        return head_bad(why, "truncated: mean/std");
    /* A NaN or Inf would reach the float-to-int8 conversion of the activations (undefined behaviour),
     * a zero std divides by zero: refuse them here, as head_blob.decode_head does. */
    if (!f32_all_ok(blob + HEAD_HDR, dim, 0))
        return head_bad(why, "mean: every value must be finite");
    if (!f32_all_ok(blob + HEAD_HDR + 4u * dim, dim, 1))
        return head_bad(why, "std: every value must be finite and > 0");
    info->n_layers = (uint8_t)n_layers;
    info->embedding_dim = (uint16_t)dim;
    info->max_width = (uint16_t)dim;
    prev = dim;
    for (l = 0; l < n_layers; l++) {
        uint32_t in, out, need;
        if (blen - off < 5u)
            return head_bad(why, "truncated: layer header");
        in = edgefl_rd_u16(blob + off);
        out = edgefl_rd_u16(blob + off + 2u);
        if (in != prev || out == 0u || blob[off + 4u] > 1u)
            return head_bad(why, "layer in/out/relu do not chain");
        off += 5u;
        need = in * out + (uint32_t)8u * out; /* <= 65535 * 65543: fits in 32 bits */
        if (blen - off < need)
            return head_bad(why, "truncated: layer weights/scales/bias");
        if (!f32_all_ok(blob + off + in * out, out, 1))
            return head_bad(why, "scales: every value must be finite and > 0");
        if (!f32_all_ok(blob + off + in * out + 4u * out, out, 0))
            return head_bad(why, "bias: every value must be finite");
        off += need;
        if (out > info->max_width)
            info->max_width = (uint16_t)out;
        prev = out;
    }
    if (off != blen || (size_t)blen != len)
        return head_bad(why, "trailing bytes after the last layer");
    info->n_classes = (uint16_t)prev;
    return EDGEFL_OK;
}

int edgefl_head_validate(const uint8_t *blob, size_t len, edgefl_head_info_t *info)
{
    return edgefl_head_check(blob, len, info, NULL);
}

/* Round half to even (as np.rint) and saturate to +-QMAX (as np.clip). The float-to-int conversion
 * only ever sees |v| < QMAX: converting NaN, Inf or a value out of int32 range is undefined
 * behaviour in C, and an extreme embedding can produce any of them. NaN becomes 0. */
static int32_t quantize_activation(float v)
{
    int32_t i;
    float frac;
    if (v != v)
        return 0;
    if (v >= (float)QMAX)
        return QMAX;
    if (v <= -(float)QMAX)
        return -QMAX;
    i = (int32_t)v; /* toward zero */
    frac = v - (float)i;
    if (frac > 0.5f || (frac == 0.5f && (i & 1)))
        i++;
    else if (frac < -0.5f || (frac == -0.5f && (i & 1)))
        i--;
    return i;
}

float edgefl_expf(float x)
{
    /* exp(x) = 2^k * exp(r), r = x - k ln2 in [-ln2/2, ln2/2]; degree-7 Taylor polynomial on r. */
    const float ln2_hi = 0.693145751953125f, ln2_lo = 1.428606765330187e-06f, log2e = 1.44269504088896341f;
    float r, p, kf, two_k;
    int32_t k;
    uint32_t bits;
    if (x != x)
        return x;
    if (x < -87.0f)
        return 0.0f;
    if (x > 88.0f)
        x = 88.0f;
    kf = x * log2e;
    k = (int32_t)(kf < 0.0f ? kf - 0.5f : kf + 0.5f);
    r = (x - (float)k * ln2_hi) - (float)k * ln2_lo;
    p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6.0f + r * (1.0f / 24.0f + r * (1.0f / 120.0f +
                                                                              r * (1.0f / 720.0f + r * (1.0f / 5040.0f)))))));
    bits = (uint32_t)(k + 127) << 23;
    memcpy(&two_k, &bits, sizeof two_k);
    return p * two_k;
}

int edgefl_head_predict(const uint8_t *blob, size_t len, const float *embedding, float *scratch,
                        size_t scratch_floats, float *logits_out, float *score_out)
{
    edgefl_head_info_t info;
    size_t off, dim, i, j, w;
    float *a, *b, *t;
    int8_t *q;
    unsigned l;
    int best;
    if (!embedding || !scratch || edgefl_head_validate(blob, len, &info) != EDGEFL_OK)
        return -EDGEFL_ERR_BAD_MESSAGE;
    w = info.max_width;
    if (scratch_floats < EDGEFL_HEAD_SCRATCH_FLOATS(w))
        return -EDGEFL_ERR_OUT_OF_MEMORY;
    a = scratch;
    b = scratch + w;
    q = (int8_t *)(void *)(scratch + 2u * w); /* int8 view of the tail: character-type access */
    dim = info.embedding_dim;
    for (i = 0; i < dim; i++) {
        float mean = edgefl_rd_f32(blob + HEAD_HDR + 4u * i);
        float sd = edgefl_rd_f32(blob + HEAD_HDR + 4u * (dim + i));
        float d = embedding[i] - mean;
        a[i] = d / sd;
    }
    off = HEAD_HDR + 8u * dim;
    for (l = 0; l < info.n_layers; l++) {
        size_t in = edgefl_rd_u16(blob + off), out = edgefl_rd_u16(blob + off + 2);
        int relu = blob[off + 4];
        const uint8_t *wq = blob + off + 5u, *scales = wq + in * out, *bias = scales + 4u * out;
        float max_abs = 0.0f, xs;
        for (i = 0; i < in; i++) {
            float v = a[i] < 0.0f ? -a[i] : a[i];
            if (v > max_abs)
                max_abs = v;
        }
        xs = max_abs / (float)QMAX;
        if (!(xs >= MIN_SCALE))
            xs = MIN_SCALE;
        for (i = 0; i < in; i++)
            q[i] = (int8_t)quantize_activation(a[i] / xs);
        for (j = 0; j < out; j++) {
            int32_t acc = 0;
            float y;
            for (i = 0; i < in; i++)
                acc += (int32_t)q[i] * (int32_t)rd_i8(wq[i * out + j]);
            y = (float)acc * xs;
            y = y * edgefl_rd_f32(scales + 4u * j);
            y = y + edgefl_rd_f32(bias + 4u * j);
            if (relu && !(y > 0.0f))
                y = y != y ? y : 0.0f;
            b[j] = y;
        }
        off += 5u + in * out + 8u * out;
        t = a;
        a = b;
        b = t;
    }
    best = 0;
    for (j = 1; j < info.n_classes; j++)
        if (a[j] > a[best])
            best = (int)j;
    if (logits_out)
        memcpy(logits_out, a, sizeof(float) * info.n_classes);
    if (score_out) {
        float sum = 0.0f;
        for (j = 0; j < info.n_classes; j++)
            sum += edgefl_expf(a[j] - a[best]);
        *score_out = 1.0f / sum;
    }
    return best;
}

/* ==== head push receiver ============================================================================ */
static void reply_ack(edgefl_head_reply_t *r, uint16_t index)
{
    r->type = EDGEFL_MSG_ACK;
    r->code = 0;
    r->index = index;
    r->detail = "";
}

static void reply_err(edgefl_head_reply_t *r, uint8_t code, const char *detail)
{
    r->type = EDGEFL_MSG_ERROR;
    r->code = code;
    r->index = 0;
    r->detail = detail;
}

void edgefl_head_rx_init(edgefl_head_rx_t *rx) { memset(rx, 0, sizeof *rx); }

void edgefl_head_rx_begin(edgefl_head_rx_t *rx, const edgefl_head_begin_t *m, edgefl_head_reply_t *reply)
{
    rx->staging = 0; /* a new BEGIN always abandons a previous, unfinished push */
    if (m->total_len == 0u || m->n_chunks == 0u || (uint32_t)m->n_chunks > m->total_len ||
        m->total_len > (uint32_t)m->n_chunks * EDGEFL_MAX_CHUNK_DATA) {
        reply_err(reply, EDGEFL_ERR_BAD_MESSAGE, "bad head_begin");
        return;
    }
    if (m->total_len > EDGEFL_HEAD_MAX_LEN || m->n_chunks > EDGEFL_HEAD_MAX_CHUNKS) {
        reply_err(reply, EDGEFL_ERR_OUT_OF_MEMORY, "head too large");
        return;
    }
    rx->staging = 1;
    rx->st_id = m->head_id;
    rx->st_total = m->total_len;
    rx->st_n_chunks = m->n_chunks;
    rx->st_crc = m->head_crc32;
    rx->st_chunk_size = 0;
    rx->st_received = 0;
    memset(rx->st_have, 0, sizeof rx->st_have);
    reply_ack(reply, 0);
}

void edgefl_head_rx_chunk(edgefl_head_rx_t *rx, const edgefl_head_chunk_t *m, edgefl_head_reply_t *reply)
{
    uint32_t c = rx->st_chunk_size, expect, last;
    uint16_t n = rx->st_n_chunks;
    if (!rx->staging || m->head_id != rx->st_id) {
        reply_err(reply, EDGEFL_ERR_BAD_MESSAGE, "no such head push");
        return;
    }
    if (m->index >= n) {
        reply_err(reply, EDGEFL_ERR_BAD_MESSAGE, "chunk index out of range");
        return;
    }
    if (c == 0u) { /* the first chunk to arrive fixes the chunk size */
        if (n == 1u)
            c = m->data_len;
        else if (m->index + 1u < n)
            c = m->data_len;
        else if (m->data_len < rx->st_total && (rx->st_total - m->data_len) % (uint32_t)(n - 1u) == 0u)
            c = (rx->st_total - m->data_len) / (uint32_t)(n - 1u);
        else
            c = 0u;
        /* every chunk but the last is full, the last one holds 1..c bytes */
        if (c == 0u || c > EDGEFL_MAX_CHUNK_DATA || (uint32_t)(n - 1u) * c >= rx->st_total ||
            rx->st_total - (uint32_t)(n - 1u) * c > c) {
            reply_err(reply, EDGEFL_ERR_BAD_LENGTH, "chunk size does not fit total_len");
            return;
        }
        rx->st_chunk_size = c;
    }
    last = rx->st_total - (uint32_t)(n - 1u) * c;
    expect = (uint32_t)m->index + 1u < n ? c : last;
    if (m->data_len != expect) {
        reply_err(reply, EDGEFL_ERR_BAD_LENGTH, "chunk length");
        return;
    }
    memcpy(rx->bufs[1u - rx->active_buf] + (size_t)m->index * c, m->data, m->data_len);
    if (!(rx->st_have[m->index >> 3] & (uint8_t)(1u << (m->index & 7u)))) {
        rx->st_have[m->index >> 3] = (uint8_t)(rx->st_have[m->index >> 3] | (1u << (m->index & 7u)));
        rx->st_received++;
    }
    reply_ack(reply, m->index);
}

void edgefl_head_rx_commit(edgefl_head_rx_t *rx, const edgefl_head_commit_t *m, edgefl_head_reply_t *reply)
{
    uint8_t st = (uint8_t)(1u - rx->active_buf);
    edgefl_head_info_t info;
    const char *why;
    if (!rx->staging || m->head_id != rx->st_id) {
        if (rx->has_head && rx->head_id == m->head_id) /* repeated COMMIT (its ACK was lost) */
            reply_ack(reply, 0);
        else
            reply_err(reply, EDGEFL_ERR_HEAD_INCOMPLETE, "no staged head");
        return;
    }
    if (rx->st_received != rx->st_n_chunks) { /* staging kept: missing chunks may still come */
        reply_err(reply, EDGEFL_ERR_HEAD_INCOMPLETE, "chunks missing");
        return;
    }
    rx->staging = 0; /* from here on the push is over either way */
    if (edgefl_crc32(EDGEFL_CRC32_INIT, rx->bufs[st], rx->st_total) != rx->st_crc) {
        reply_err(reply, EDGEFL_ERR_HEAD_CRC, "head crc32 mismatch");
        return;
    }
    if (edgefl_head_check(rx->bufs[st], rx->st_total, &info, &why) != EDGEFL_OK) {
        reply_err(reply, EDGEFL_ERR_BAD_MESSAGE, why);
        return;
    }
    if (info.max_width > EDGEFL_HEAD_MAX_WIDTH) {
        reply_err(reply, EDGEFL_ERR_OUT_OF_MEMORY, "head too wide");
        return;
    }
    rx->active_buf = st;
    rx->has_head = 1;
    rx->head_id = rx->st_id;
    rx->head_len = rx->st_total;
    rx->info = info;
    reply_ack(reply, 0);
}

const uint8_t *edgefl_head_rx_active(const edgefl_head_rx_t *rx, uint32_t *len)
{
    if (!rx->has_head) {
        if (len)
            *len = 0;
        return NULL;
    }
    if (len)
        *len = rx->head_len;
    return rx->bufs[rx->active_buf];
}

/* ==== device dispatcher ============================================================================= */
void edgefl_device_init(edgefl_device_t *dev, const char *board, uint16_t sensor_rate_hz, uint32_t free_ram,
                        uint32_t arena_size)
{
    edgefl_decoder_init(&dev->dec);
    edgefl_head_rx_init(&dev->head);
    dev->tx_seq = 0;
    dev->board = board ? board : "";
    dev->sensor_rate_hz = sensor_rate_hz;
    dev->free_ram = free_ram;
    dev->arena_size = arena_size;
    dev->uptime_ms = 0;
    dev->err_tokens = EDGEFL_ERROR_REPLY_BURST * 1000u; /* a full bucket */
    dev->err_last_ms = 0;
    dev->errors_suppressed = 0;
    dev->errors_unanswered = 0;
}

long edgefl_device_send(edgefl_device_t *dev, const edgefl_msg_t *m, uint8_t *tx, size_t tx_cap)
{
    long n = edgefl_encode_message_frame(m, dev->tx_seq, tx, tx_cap);
    if (n > 0)
        dev->tx_seq++;
    return n;
}

/* The ERROR-reply rule (firmware_bridge/error_replies.py): never answer an ERROR frame; otherwise spend
 * one token of a bucket refilled at EDGEFL_ERROR_REPLY_RATE per second up to EDGEFL_ERROR_REPLY_BURST. */
static int error_reply_allowed(edgefl_device_t *dev, uint8_t frame_type)
{
    const uint32_t full = EDGEFL_ERROR_REPLY_BURST * 1000u;
    uint32_t elapsed;
    if (frame_type == EDGEFL_MSG_ERROR) {
        dev->errors_unanswered++;
        return 0;
    }
    elapsed = dev->uptime_ms - dev->err_last_ms; /* unsigned: right across the 2^32 wrap */
    dev->err_last_ms = dev->uptime_ms;
    /* RATE replies per second = RATE thousandths per ms; past the time to refill all, the product
     * could overflow, so fill directly. */
    if (elapsed >= full / EDGEFL_ERROR_REPLY_RATE)
        dev->err_tokens = full;
    else {
        dev->err_tokens += elapsed * EDGEFL_ERROR_REPLY_RATE;
        if (dev->err_tokens > full)
            dev->err_tokens = full;
    }
    if (dev->err_tokens >= 1000u) {
        dev->err_tokens -= 1000u;
        return 1;
    }
    dev->errors_suppressed++;
    return 0;
}

/* ERROR `code` in answer to a received frame of `frame_type`, if the ERROR-reply rule allows it. */
static long reply_error(edgefl_device_t *dev, uint8_t frame_type, uint8_t code, const char *detail, uint8_t *tx,
                        size_t tx_cap)
{
    edgefl_msg_t r;
    size_t n = strlen(detail);
    if (!error_reply_allowed(dev, frame_type))
        return 0;
    r.type = EDGEFL_MSG_ERROR;
    r.u.error.code = code;
    r.u.error.detail_len = (uint8_t)(n > 255u ? 255u : n);
    r.u.error.detail = detail;
    return edgefl_device_send(dev, &r, tx, tx_cap);
}

long edgefl_device_feed(edgefl_device_t *dev, uint8_t byte, uint32_t now_ms, uint8_t *tx, size_t tx_cap,
                        edgefl_msg_t *msg_out, uint16_t *msg_seq)
{
    edgefl_frame_t f;
    edgefl_msg_t m, r;
    edgefl_head_reply_t hr;
    int st = edgefl_decoder_feed(&dev->dec, byte, &f), rc;
    dev->uptime_ms = now_ms;
    if (msg_out)
        msg_out->type = 0;
    if (st == EDGEFL_FEED_NONE)
        return 0;
    if (st == EDGEFL_FEED_BAD_VERSION)
        return reply_error(dev, f.type, EDGEFL_ERR_BAD_VERSION, "this MCU speaks another protocol version", tx,
                           tx_cap);
    rc = edgefl_decode_message(f.type, f.payload, f.length, &m);
    if (rc == EDGEFL_ERR_UNKNOWN_TYPE)
        return reply_error(dev, f.type, EDGEFL_ERR_UNKNOWN_TYPE, "unknown message type", tx, tx_cap);
    if (rc != EDGEFL_OK)
        return reply_error(dev, f.type, (uint8_t)rc, rc == EDGEFL_ERR_BAD_LENGTH ? "payload size" : "bad payload", tx,
                           tx_cap);
    if (msg_out) {
        *msg_out = m;
        if (msg_seq)
            *msg_seq = f.seq;
    }
    switch (m.type) {
    case EDGEFL_MSG_HELLO: {
        size_t n = strlen(dev->board);
        if (m.u.hello.proto_version != EDGEFL_PROTO_VERSION)
            return reply_error(dev, f.type, EDGEFL_ERR_BAD_VERSION, "agent speaks another protocol version", tx,
                               tx_cap);
        r.type = EDGEFL_MSG_HELLO;
        r.u.hello.proto_version = EDGEFL_PROTO_VERSION;
        r.u.hello.sensor_rate_hz = dev->sensor_rate_hz;
        r.u.hello.free_ram = dev->free_ram;
        r.u.hello.arena_size = dev->arena_size;
        r.u.hello.board_len = (uint8_t)(n > 255u ? 255u : n);
        r.u.hello.board = dev->board;
        return edgefl_device_send(dev, &r, tx, tx_cap);
    }
    case EDGEFL_MSG_HEARTBEAT:
        r.type = EDGEFL_MSG_HEARTBEAT;
        r.u.heartbeat.uptime_ms = dev->uptime_ms;
        return edgefl_device_send(dev, &r, tx, tx_cap);
    case EDGEFL_MSG_HEAD_BEGIN: edgefl_head_rx_begin(&dev->head, &m.u.head_begin, &hr); break;
    case EDGEFL_MSG_HEAD_CHUNK: edgefl_head_rx_chunk(&dev->head, &m.u.head_chunk, &hr); break;
    case EDGEFL_MSG_HEAD_COMMIT: edgefl_head_rx_commit(&dev->head, &m.u.head_commit, &hr); break;
    default: return 0; /* ACK, ERROR, SENSOR_WINDOW, INFER_RESULT: for the application, not answered */
    }
    if (hr.type == EDGEFL_MSG_ERROR)
        return reply_error(dev, f.type, hr.code, hr.detail, tx, tx_cap);
    r.type = EDGEFL_MSG_ACK;
    r.u.ack.acked_type = m.type;
    r.u.ack.acked_seq = f.seq;
    r.u.ack.status = 0;
    r.u.ack.index = hr.index;
    return edgefl_device_send(dev, &r, tx, tx_cap);
}
