/*
 * Host test driver for edgefl_proto (compiled and run by tests/unit/test_firmware_c.py).
 *
 *   gcc -std=c99 -Wall -Wextra -Wpedantic -Werror -O2 -o test_host test_host.c edgefl_proto.c
 *
 * Line-oriented stdin -> stdout, one mode per run:
 *
 *   test_host decode   stdin: lines of hex wire bytes (frames, garbage, anything); fed byte by byte to
 *                      edgefl_decoder_feed. stdout: one canonical line per intact frame (see below),
 *                      then "STATS frames=.. bad_crc=.. bad_length=.. bad_cobs=.. bad_header=..
 *                      overruns=.. version_mismatches=..".
 *   test_host encode   stdin: canonical lines. stdout: hex of the C-encoded frame (0x00 included).
 *   test_host head     stdin: "HEAD <hex blob>" then "EMB <hex f32 LE x dim>" lines.
 *                      stdout: "CLASS <c> score=<f32 bits hex>" per EMB (or "ERR <code>").
 *   test_host device   an MCU: "RX <hex>" feeds bytes to edgefl_device_feed, every reply frame is
 *                      printed as "TX <hex>"; "UPTIME <ms>" sets the clock passed as now_ms (0 at
 *                      start); "STATE" prints "STATE head=<id|none> len=<n>"; "PREDICT <hex f32>" runs
 *                      the active head ("CLASS <c> score=<hex>" or "NO_HEAD"); "STATS" prints
 *                      "STATS errors_suppressed=<n> errors_unanswered=<n> <decoder counters>";
 *                      "SYNC" prints "SYNC". stdout is flushed after every line, so a test can
 *                      drive it interactively (wire two of them together, or one to the emulator).
 *                      Built with -DEDGEFL_PROTO_VERSION=2u it is a peer of another version.
 *
 * Canonical message lines (integers decimal, floats as 0x<8 hex digits> of their bits, byte strings as
 * lowercase hex, text with every byte outside 0x21..0x7e and '%' written as %XX):
 *   HELLO seq=3 proto=1 rate=50 ram=20480 arena=16384 board=nano33
 *   SENSOR_WINDOW seq=1 id=7 n=2 ch=3 label=-1 scale=0x3a800000 samples=1,-2,3,4,5,-32768
 *   HEAD_BEGIN seq=1 head=5 total=1000 chunks=4 crc=0x1234abcd
 *   HEAD_CHUNK seq=1 head=5 index=0 data=00ff10
 *   HEAD_COMMIT seq=1 head=5
 *   ACK seq=1 type=4 acked_seq=9 status=0 index=2
 *   INFER_RESULT seq=1 window=7 class=2 score=0x3f000000 head=5
 *   HEARTBEAT seq=1 uptime=12345
 *   ERROR seq=1 code=5 detail=chunks%20missing
 * Frames that decode but carry no valid message (decode mode only):
 *   BAD_VERSION seq=.. version=.. type=..      UNKNOWN seq=.. type=..      BADMSG seq=.. type=.. code=..
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edgefl_proto.h"

#define LINE_MAX_CHARS (1u << 20)
static char line[LINE_MAX_CHARS];
static uint8_t bytes[LINE_MAX_CHARS / 2];

static int read_line(void)
{
    size_t n = 0;
    int c;
    while ((c = getchar()) != EOF && c != '\n') {
        if (n + 1 >= sizeof line) {
            fprintf(stderr, "line too long\n");
            exit(2);
        }
        if (c != '\r')
            line[n++] = (char)c;
    }
    line[n] = 0;
    return !(c == EOF && n == 0);
}

static int hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Hex (whitespace ignored, up to the end of the string) into out; returns the byte count. */
static size_t parse_hex(const char *s, uint8_t *out, size_t cap)
{
    size_t n = 0;
    int hi = -1;
    for (; *s; s++) {
        int v = hexval((unsigned char)*s);
        if (v < 0) {
            if (*s == ' ' || *s == '\t')
                continue;
            fprintf(stderr, "bad hex char '%c'\n", *s);
            exit(2);
        }
        if (hi < 0)
            hi = v;
        else {
            if (n >= cap) {
                fprintf(stderr, "hex too long\n");
                exit(2);
            }
            out[n++] = (uint8_t)(hi * 16 + v);
            hi = -1;
        }
    }
    if (hi >= 0) {
        fprintf(stderr, "odd hex length\n");
        exit(2);
    }
    return n;
}

static void print_hex(const uint8_t *p, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++)
        printf("%02x", p[i]);
}

static void print_text(const char *s, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x21 && c <= 0x7e && c != '%')
            putchar(c);
        else
            printf("%%%02X", c);
    }
}

static unsigned long f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (unsigned long)u;
}

static void print_message(uint16_t seq, const edgefl_msg_t *m)
{
    switch (m->type) {
    case EDGEFL_MSG_HELLO:
        printf("HELLO seq=%u proto=%u rate=%u ram=%lu arena=%lu board=", (unsigned)seq, (unsigned)m->u.hello.proto_version,
               (unsigned)m->u.hello.sensor_rate_hz, (unsigned long)m->u.hello.free_ram, (unsigned long)m->u.hello.arena_size);
        print_text(m->u.hello.board, m->u.hello.board_len);
        break;
    case EDGEFL_MSG_SENSOR_WINDOW: {
        const edgefl_sensor_window_t *w = &m->u.sensor_window;
        size_t i, n = (size_t)w->n_samples * w->n_channels;
        printf("SENSOR_WINDOW seq=%u id=%lu n=%u ch=%u label=%d scale=0x%08lx samples=", (unsigned)seq,
               (unsigned long)w->window_id, (unsigned)w->n_samples, (unsigned)w->n_channels, (int)w->label,
               f32_bits(w->scale));
        for (i = 0; i < n; i++)
            printf(i ? ",%d" : "%d", (int)edgefl_sensor_sample(w, i));
        break;
    }
    case EDGEFL_MSG_HEAD_BEGIN:
        printf("HEAD_BEGIN seq=%u head=%lu total=%lu chunks=%u crc=0x%08lx", (unsigned)seq, (unsigned long)m->u.head_begin.head_id,
               (unsigned long)m->u.head_begin.total_len, (unsigned)m->u.head_begin.n_chunks,
               (unsigned long)m->u.head_begin.head_crc32);
        break;
    case EDGEFL_MSG_HEAD_CHUNK:
        printf("HEAD_CHUNK seq=%u head=%lu index=%u data=", (unsigned)seq, (unsigned long)m->u.head_chunk.head_id,
               (unsigned)m->u.head_chunk.index);
        print_hex(m->u.head_chunk.data, m->u.head_chunk.data_len);
        break;
    case EDGEFL_MSG_HEAD_COMMIT:
        printf("HEAD_COMMIT seq=%u head=%lu", (unsigned)seq, (unsigned long)m->u.head_commit.head_id);
        break;
    case EDGEFL_MSG_ACK:
        printf("ACK seq=%u type=%u acked_seq=%u status=%u index=%u", (unsigned)seq, (unsigned)m->u.ack.acked_type,
               (unsigned)m->u.ack.acked_seq, (unsigned)m->u.ack.status, (unsigned)m->u.ack.index);
        break;
    case EDGEFL_MSG_INFER_RESULT:
        printf("INFER_RESULT seq=%u window=%lu class=%u score=0x%08lx head=%lu", (unsigned)seq,
               (unsigned long)m->u.infer_result.window_id, (unsigned)m->u.infer_result.class_id,
               f32_bits(m->u.infer_result.score), (unsigned long)m->u.infer_result.head_id);
        break;
    case EDGEFL_MSG_HEARTBEAT:
        printf("HEARTBEAT seq=%u uptime=%lu", (unsigned)seq, (unsigned long)m->u.heartbeat.uptime_ms);
        break;
    case EDGEFL_MSG_ERROR:
        printf("ERROR seq=%u code=%u detail=", (unsigned)seq, (unsigned)m->u.error.code);
        print_text(m->u.error.detail, m->u.error.detail_len);
        break;
    default:
        printf("?");
    }
    putchar('\n');
}

/* ---- decode mode ------------------------------------------------------------------------------- */
static int mode_decode(void)
{
    static edgefl_decoder_t dec;
    edgefl_decoder_init(&dec);
    while (read_line()) {
        size_t i, n = parse_hex(line, bytes, sizeof bytes);
        for (i = 0; i < n; i++) {
            edgefl_frame_t f;
            edgefl_msg_t m;
            int r = edgefl_decoder_feed(&dec, bytes[i], &f), rc;
            if (r == EDGEFL_FEED_NONE)
                continue;
            if (r == EDGEFL_FEED_BAD_VERSION) {
                printf("BAD_VERSION seq=%u version=%u type=%u\n", (unsigned)f.seq, (unsigned)f.version, (unsigned)f.type);
                continue;
            }
            rc = edgefl_decode_message(f.type, f.payload, f.length, &m);
            if (rc == EDGEFL_ERR_UNKNOWN_TYPE)
                printf("UNKNOWN seq=%u type=%u\n", (unsigned)f.seq, (unsigned)f.type);
            else if (rc != EDGEFL_OK)
                printf("BADMSG seq=%u type=%u code=%d\n", (unsigned)f.seq, (unsigned)f.type, rc);
            else
                print_message(f.seq, &m);
        }
    }
    printf("STATS frames=%lu bad_crc=%lu bad_length=%lu bad_cobs=%lu bad_header=%lu overruns=%lu version_mismatches=%lu\n",
           (unsigned long)dec.stats.frames, (unsigned long)dec.stats.bad_crc, (unsigned long)dec.stats.bad_length,
           (unsigned long)dec.stats.bad_cobs, (unsigned long)dec.stats.bad_header, (unsigned long)dec.stats.overruns,
           (unsigned long)dec.stats.version_mismatches);
    return 0;
}

/* ---- encode mode ------------------------------------------------------------------------------- */
#define MAX_FIELDS 16
static char *keys[MAX_FIELDS], *vals[MAX_FIELDS];
static int n_fields;

static const char *field(const char *key)
{
    int i;
    for (i = 0; i < n_fields; i++)
        if (strcmp(keys[i], key) == 0)
            return vals[i];
    fprintf(stderr, "missing field %s in: %s\n", key, line);
    exit(2);
}

static unsigned long ufield(const char *key) { return strtoul(field(key), NULL, 0); }
static long ifield(const char *key) { return strtol(field(key), NULL, 0); }

static float ffield(const char *key)
{
    uint32_t u = (uint32_t)strtoul(field(key), NULL, 16);
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Undo print_text's %XX escapes in place; returns the length. */
static size_t unescape(char *s)
{
    char *o = s, *i = s;
    while (*i) {
        if (*i == '%' && hexval((unsigned char)i[1]) >= 0 && hexval((unsigned char)i[2]) >= 0) {
            *o++ = (char)(hexval((unsigned char)i[1]) * 16 + hexval((unsigned char)i[2]));
            i += 3;
        } else
            *o++ = *i++;
    }
    *o = 0;
    return (size_t)(o - s);
}

/* Space-separated tokens, in place (strtok_r is not C99). */
static char *next_token(char **cur)
{
    char *s = *cur, *t;
    while (*s == ' ')
        s++;
    if (!*s)
        return NULL;
    t = s;
    while (*s && *s != ' ')
        s++;
    if (*s)
        *s++ = 0;
    *cur = s;
    return t;
}

static int mode_encode(void)
{
    static uint8_t frame[EDGEFL_MAX_FRAME];
    static int16_t samples[EDGEFL_SENSOR_WINDOW_MAX_VALUES];
    static uint8_t data[EDGEFL_MAX_CHUNK_DATA + 1];
    while (read_line()) {
        char *name, *tok, *cur = line;
        edgefl_msg_t m;
        long n;
        if (!line[0])
            continue;
        name = next_token(&cur);
        n_fields = 0;
        while ((tok = next_token(&cur)) != NULL && n_fields < MAX_FIELDS) {
            char *eq = strchr(tok, '=');
            if (!eq) {
                fprintf(stderr, "bad token %s\n", tok);
                return 2;
            }
            *eq = 0;
            keys[n_fields] = tok;
            vals[n_fields++] = eq + 1;
        }
        memset(&m, 0, sizeof m);
        if (strcmp(name, "HELLO") == 0) {
            char *board = (char *)field("board");
            m.type = EDGEFL_MSG_HELLO;
            m.u.hello.proto_version = (uint8_t)ufield("proto");
            m.u.hello.sensor_rate_hz = (uint16_t)ufield("rate");
            m.u.hello.free_ram = (uint32_t)ufield("ram");
            m.u.hello.arena_size = (uint32_t)ufield("arena");
            m.u.hello.board_len = (uint8_t)unescape(board);
            m.u.hello.board = board;
        } else if (strcmp(name, "SENSOR_WINDOW") == 0) {
            const char *s = field("samples");
            size_t k = 0;
            m.type = EDGEFL_MSG_SENSOR_WINDOW;
            m.u.sensor_window.window_id = (uint32_t)ufield("id");
            m.u.sensor_window.n_samples = (uint16_t)ufield("n");
            m.u.sensor_window.n_channels = (uint8_t)ufield("ch");
            m.u.sensor_window.label = (int8_t)ifield("label");
            m.u.sensor_window.scale = ffield("scale");
            while (*s && k < EDGEFL_SENSOR_WINDOW_MAX_VALUES) {
                char *end;
                samples[k++] = (int16_t)strtol(s, &end, 10);
                s = *end == ',' ? end + 1 : end;
            }
            if (k != (size_t)m.u.sensor_window.n_samples * m.u.sensor_window.n_channels) {
                fprintf(stderr, "sample count %lu does not match n x ch\n", (unsigned long)k);
                return 2;
            }
            m.u.sensor_window.samples = samples;
        } else if (strcmp(name, "HEAD_BEGIN") == 0) {
            m.type = EDGEFL_MSG_HEAD_BEGIN;
            m.u.head_begin.head_id = (uint32_t)ufield("head");
            m.u.head_begin.total_len = (uint32_t)ufield("total");
            m.u.head_begin.n_chunks = (uint16_t)ufield("chunks");
            m.u.head_begin.head_crc32 = (uint32_t)ufield("crc");
        } else if (strcmp(name, "HEAD_CHUNK") == 0) {
            m.type = EDGEFL_MSG_HEAD_CHUNK;
            m.u.head_chunk.head_id = (uint32_t)ufield("head");
            m.u.head_chunk.index = (uint16_t)ufield("index");
            m.u.head_chunk.data_len = (uint16_t)parse_hex(field("data"), data, sizeof data);
            m.u.head_chunk.data = data;
        } else if (strcmp(name, "HEAD_COMMIT") == 0) {
            m.type = EDGEFL_MSG_HEAD_COMMIT;
            m.u.head_commit.head_id = (uint32_t)ufield("head");
        } else if (strcmp(name, "ACK") == 0) {
            m.type = EDGEFL_MSG_ACK;
            m.u.ack.acked_type = (uint8_t)ufield("type");
            m.u.ack.acked_seq = (uint16_t)ufield("acked_seq");
            m.u.ack.status = (uint8_t)ufield("status");
            m.u.ack.index = (uint16_t)ufield("index");
        } else if (strcmp(name, "INFER_RESULT") == 0) {
            m.type = EDGEFL_MSG_INFER_RESULT;
            m.u.infer_result.window_id = (uint32_t)ufield("window");
            m.u.infer_result.class_id = (uint8_t)ufield("class");
            m.u.infer_result.score = ffield("score");
            m.u.infer_result.head_id = (uint32_t)ufield("head");
        } else if (strcmp(name, "HEARTBEAT") == 0) {
            m.type = EDGEFL_MSG_HEARTBEAT;
            m.u.heartbeat.uptime_ms = (uint32_t)ufield("uptime");
        } else if (strcmp(name, "ERROR") == 0) {
            char *detail = (char *)field("detail");
            m.type = EDGEFL_MSG_ERROR;
            m.u.error.code = (uint8_t)ufield("code");
            m.u.error.detail_len = (uint8_t)unescape(detail);
            m.u.error.detail = detail;
        } else {
            fprintf(stderr, "unknown message %s\n", name);
            return 2;
        }
        n = edgefl_encode_message_frame(&m, (uint16_t)ufield("seq"), frame, sizeof frame);
        if (n < 0) {
            printf("ERR %ld\n", n);
            continue;
        }
        print_hex(frame, (size_t)n);
        putchar('\n');
    }
    return 0;
}

/* ---- head mode --------------------------------------------------------------------------------- */
static float scratch[EDGEFL_HEAD_SCRATCH_FLOATS(4096u)];

static void predict(const uint8_t *blob, size_t blob_len, const char *hex)
{
    static uint8_t raw[4u * 4096u];
    static float emb[4096];
    size_t n = parse_hex(hex, raw, sizeof raw), i;
    float score = 0.0f;
    int c;
    for (i = 0; i < n / 4u; i++)
        emb[i] = edgefl_rd_f32(raw + 4u * i);
    c = edgefl_head_predict(blob, blob_len, emb, scratch, sizeof scratch / sizeof scratch[0], NULL, &score);
    if (c < 0)
        printf("ERR %d\n", -c);
    else
        printf("CLASS %d score=0x%08lx\n", c, f32_bits(score));
}

static int mode_head(void)
{
    static uint8_t blob[1u << 18];
    size_t blob_len = 0;
    while (read_line()) {
        if (strncmp(line, "HEAD ", 5) == 0)
            blob_len = parse_hex(line + 5, blob, sizeof blob);
        else if (strncmp(line, "EMB ", 4) == 0)
            predict(blob, blob_len, line + 4);
    }
    return 0;
}

/* ---- device mode ------------------------------------------------------------------------------- */
static int mode_device(void)
{
    static edgefl_device_t dev;
    static uint8_t tx[EDGEFL_MAX_FRAME];
    uint32_t now_ms = 0;
    edgefl_device_init(&dev, "host-test", 50u, 20480ul, 16384ul);
    while (read_line()) {
        if (strncmp(line, "RX ", 3) == 0) {
            size_t i, n = parse_hex(line + 3, bytes, sizeof bytes);
            for (i = 0; i < n; i++) {
                long r = edgefl_device_feed(&dev, bytes[i], now_ms, tx, sizeof tx, NULL, NULL);
                if (r > 0) {
                    printf("TX ");
                    print_hex(tx, (size_t)r);
                    putchar('\n');
                } else if (r < 0)
                    printf("TXERR %ld\n", r);
            }
        } else if (strncmp(line, "UPTIME ", 7) == 0) {
            now_ms = (uint32_t)strtoul(line + 7, NULL, 10);
        } else if (strcmp(line, "SYNC") == 0) {
            printf("SYNC\n");
        } else if (strcmp(line, "STATS") == 0) {
            const edgefl_decoder_stats_t *d = &dev.dec.stats;
            printf("STATS errors_suppressed=%lu errors_unanswered=%lu frames=%lu bad_crc=%lu version_mismatches=%lu\n",
                   (unsigned long)dev.errors_suppressed, (unsigned long)dev.errors_unanswered,
                   (unsigned long)d->frames, (unsigned long)d->bad_crc, (unsigned long)d->version_mismatches);
        } else if (strcmp(line, "STATE") == 0) {
            uint32_t len;
            if (edgefl_head_rx_active(&dev.head, &len))
                printf("STATE head=%lu len=%lu\n", (unsigned long)dev.head.head_id, (unsigned long)len);
            else
                printf("STATE head=none len=0\n");
        } else if (strncmp(line, "PREDICT ", 8) == 0) {
            uint32_t len;
            const uint8_t *blob = edgefl_head_rx_active(&dev.head, &len);
            if (!blob)
                printf("NO_HEAD\n");
            else
                predict(blob, len, line + 8);
        }
        fflush(stdout);
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "decode") == 0)
        return mode_decode();
    if (argc == 2 && strcmp(argv[1], "encode") == 0)
        return mode_encode();
    if (argc == 2 && strcmp(argv[1], "head") == 0)
        return mode_head();
    if (argc == 2 && strcmp(argv[1], "device") == 0)
        return mode_device();
    fprintf(stderr, "usage: %s decode|encode|head|device  (stdin/stdout lines, see the top of test_host.c)\n", argv[0]);
    return 2;
}
