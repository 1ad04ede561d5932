// edge-fl MCU example: streams IMU windows to the device agent over the serial protocol
// (firmware_bridge/PROTOCOL.md), answers HELLO / HEARTBEAT, receives head pushes and, when the board
// runs the TFLite Micro backbone, classifies every window with the pushed int8 head (INFER_RESULT).
//
// Build: copy (or symlink) ../edgefl_proto.h and ../edgefl_proto.c next to this file, see ../README.md.
//
// Board hooks, each clearly marked below:
//   1. IMU        imu_begin() / imu_read(): stub (synthetic motion) unless EDGEFL_IMU selects a driver
//   2. BACKBONE   backbone_embed(): returns false unless you wire in the TFLite Micro backbone
//   3. MEMORY     free_ram_bytes(): reported in HELLO
#include <Arduino.h>

#include "edgefl_proto.h"

// ---- configuration ---------------------------------------------------------------------------------
#define SAMPLE_RATE_HZ 50
#define WINDOW_SAMPLES 100  // 2 s at 50 Hz, as edge_agent.data.windows.WindowConfig
#define WINDOW_STRIDE 25    // send a window every 0.5 s (the training stride); 100 = no overlap
#define N_CHANNELS 6        // acc x y z, gyro x y z
#define HEARTBEAT_MS 1000
#define BOARD_NAME "nano33ble"
#define ARENA_SIZE 0        // TFLite Micro tensor arena bytes (0 = no backbone on this board)

// 0 = stub (synthetic signal), 1 = Arduino_LSM9DS1 (Nano 33 BLE Sense Rev1), 2 = Arduino_BMI270_BMM150 (Rev2)
#ifndef EDGEFL_IMU
#define EDGEFL_IMU 0
#endif

#if EDGEFL_IMU == 1
#include <Arduino_LSM9DS1.h>
#elif EDGEFL_IMU == 2
#include <Arduino_BMI270_BMM150.h>
#endif

static edgefl_device_t dev;            // decoder + active/staging head buffers (see EDGEFL_HEAD_MAX_LEN)
static uint8_t tx[EDGEFL_MAX_FRAME];   // one outgoing frame
static float ring[WINDOW_SAMPLES][N_CHANNELS];
static uint32_t n_samples_total = 0;
static uint32_t window_id = 0;
static int16_t window_q[WINDOW_SAMPLES * N_CHANNELS];
static float window_f[WINDOW_SAMPLES * N_CHANNELS];

// =====================================================================================================
// BOARD HOOK 1: IMU. Fill v[0..5] with acc x,y,z and gyro x,y,z in the units the backbone was trained
// on (the watch recordings of edge_agent.data.watch). Return false if no new sample could be read.
// =====================================================================================================
static bool imu_begin()
{
#if EDGEFL_IMU == 1 || EDGEFL_IMU == 2
    return IMU.begin();
#else
    return true;
#endif
}

static bool imu_read(float v[N_CHANNELS])
{
#if EDGEFL_IMU == 1 || EDGEFL_IMU == 2
    if (!IMU.accelerationAvailable() || !IMU.gyroscopeAvailable())
        return false;
    IMU.readAcceleration(v[0], v[1], v[2]);  // g
    IMU.readGyroscope(v[3], v[4], v[5]);     // degrees per second
    return true;
#else
    // STUB: a synthetic arm swing so the link can be tested without a sensor.
    float t = (float)n_samples_total / SAMPLE_RATE_HZ;
    v[0] = 0.5f * sinf(6.2832f * 0.8f * t);
    v[1] = 0.2f * cosf(6.2832f * 0.8f * t);
    v[2] = 1.0f;
    v[3] = 40.0f * cosf(6.2832f * 0.8f * t);
    v[4] = 0.0f;
    v[5] = 5.0f * sinf(6.2832f * 1.6f * t);
    return true;
#endif
}

// =====================================================================================================
// BOARD HOOK 2: BACKBONE. If the board runs the TFLite Micro backbone (models/backbone_int8.tflite),
// run it on the float window (WINDOW_SAMPLES x N_CHANNELS, sample-major) and write the embedding
// (the pushed head's embedding_dim floats) to `embedding`; return true. Without a backbone, return
// false: the agent then computes embeddings itself from the SENSOR_WINDOW frames.
// =====================================================================================================
static bool backbone_embed(const float *window, float *embedding, size_t embedding_dim)
{
    (void)window;
    (void)embedding;
    (void)embedding_dim;
    return false;  // <- replace with: copy window into the input tensor, interpreter.Invoke(), copy output
}

// =====================================================================================================
// BOARD HOOK 3: MEMORY. Free RAM reported in HELLO (0 = unknown).
// =====================================================================================================
static uint32_t free_ram_bytes() { return 0; }

// ---- protocol plumbing ------------------------------------------------------------------------------
static void send(const edgefl_msg_t *m)
{
    long n = edgefl_device_send(&dev, m, tx, sizeof tx);
    if (n > 0)
        Serial.write(tx, (size_t)n);
}

static void poll_serial()
{
    while (Serial.available() > 0) {
        uint8_t b = (uint8_t)Serial.read();
        // HELLO, HEARTBEAT and the head push (BEGIN / CHUNK / COMMIT) are answered inside; millis()
        // is the uptime HEARTBEAT replies carry and the clock of the ERROR-reply rate limit.
        long n = edgefl_device_feed(&dev, b, millis(), tx, sizeof tx, NULL, NULL);
        if (n > 0)
            Serial.write(tx, (size_t)n);
    }
}

static void send_window()
{
    // Oldest sample first: the ring holds the last WINDOW_SAMPLES samples.
    float peak = 0.0f;
    for (int s = 0; s < WINDOW_SAMPLES; s++) {
        const float *src = ring[(n_samples_total + (uint32_t)s) % WINDOW_SAMPLES];
        for (int c = 0; c < N_CHANNELS; c++) {
            float v = src[c];
            window_f[s * N_CHANNELS + c] = v;
            if (fabsf(v) > peak)
                peak = fabsf(v);
        }
    }
    // One scale for the window, full int16 range (as messages.choose_scale on the agent).
    float scale = peak > 0.0f ? peak / 32767.0f : 1.0f;
    for (int i = 0; i < WINDOW_SAMPLES * N_CHANNELS; i++) {
        long q = lroundf(window_f[i] / scale);
        window_q[i] = (int16_t)(q > 32767 ? 32767 : q < -32768 ? -32768 : q);
    }
    edgefl_msg_t m;
    m.type = EDGEFL_MSG_SENSOR_WINDOW;
    m.u.sensor_window.window_id = window_id;
    m.u.sensor_window.n_samples = WINDOW_SAMPLES;
    m.u.sensor_window.n_channels = N_CHANNELS;
    m.u.sensor_window.label = -1;
    m.u.sensor_window.scale = scale;
    m.u.sensor_window.samples = window_q;
    m.u.sensor_window.samples_le = NULL;
    send(&m);

    // On-device inference: only with a backbone and a committed head.
    uint32_t head_len;
    const uint8_t *head = edgefl_head_rx_active(&dev.head, &head_len);
    if (head) {
        static float embedding[EDGEFL_HEAD_MAX_WIDTH];
        static float scratch[EDGEFL_HEAD_SCRATCH_FLOATS(EDGEFL_HEAD_MAX_WIDTH)];
        if (dev.head.info.embedding_dim <= EDGEFL_HEAD_MAX_WIDTH &&
            backbone_embed(window_f, embedding, dev.head.info.embedding_dim)) {
            float score = 0.0f;
            int cls = edgefl_head_predict(head, head_len, embedding, scratch, sizeof scratch / sizeof scratch[0], NULL, &score);
            if (cls >= 0) {
                edgefl_msg_t r;
                r.type = EDGEFL_MSG_INFER_RESULT;
                r.u.infer_result.window_id = window_id;
                r.u.infer_result.class_id = (uint8_t)cls;
                r.u.infer_result.score = score;
                r.u.infer_result.head_id = dev.head.head_id;
                send(&r);
            }
        }
    }
    window_id++;
}

void setup()
{
    Serial.begin(115200);
    while (!Serial && millis() < 3000) {
    }
    edgefl_device_init(&dev, BOARD_NAME, SAMPLE_RATE_HZ, free_ram_bytes(), ARENA_SIZE);
    if (!imu_begin()) {
        edgefl_msg_t e;
        e.type = EDGEFL_MSG_ERROR;
        e.u.error.code = EDGEFL_ERR_BAD_MESSAGE;
        e.u.error.detail = "IMU init failed";
        e.u.error.detail_len = (uint8_t)strlen(e.u.error.detail);
        send(&e);
    }
    // Announce ourselves once; the agent also sends HELLO and gets one back.
    edgefl_msg_t h;
    h.type = EDGEFL_MSG_HELLO;
    h.u.hello.proto_version = EDGEFL_PROTO_VERSION;
    h.u.hello.sensor_rate_hz = SAMPLE_RATE_HZ;
    h.u.hello.free_ram = free_ram_bytes();
    h.u.hello.arena_size = ARENA_SIZE;
    h.u.hello.board = BOARD_NAME;
    h.u.hello.board_len = (uint8_t)strlen(BOARD_NAME);
    send(&h);
}

void loop()
{
    static uint32_t next_sample_us = micros();
    static uint32_t next_heartbeat_ms = millis();

    poll_serial();

    if ((int32_t)(micros() - next_sample_us) >= 0) {
        next_sample_us += 1000000UL / SAMPLE_RATE_HZ;
        float v[N_CHANNELS];
        if (imu_read(v)) {
            memcpy(ring[n_samples_total % WINDOW_SAMPLES], v, sizeof v);
            n_samples_total++;
            if (n_samples_total >= WINDOW_SAMPLES && (n_samples_total - WINDOW_SAMPLES) % WINDOW_STRIDE == 0)
                send_window();
        }
    }

    if ((int32_t)(millis() - next_heartbeat_ms) >= 0) {
        next_heartbeat_ms += HEARTBEAT_MS;
        edgefl_msg_t hb;
        hb.type = EDGEFL_MSG_HEARTBEAT;
        hb.u.heartbeat.uptime_ms = millis();
        send(&hb);
    }
}
