// Shared helpers for the browser tests and the screenshot script: start the real sftd binary on
// 127.0.0.1 with an ephemeral port and a temp data dir, launch Debian's Chromium, talk to the API.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const BIN = path.resolve(ROOT, process.env.SFTD_BIN || 'target/debug/sftd');
export const EXAMPLE = process.env.SFTD_EXAMPLE || path.join(ROOT, 'examples/tool_calls.jsonl');
export const EXAMPLE_VAL = process.env.SFTD_EXAMPLE_VAL || path.join(ROOT, 'examples/tool_calls_val.jsonl');
/** The model the tests train: the built-in demo model unless SFTD_TEST_MODEL names another. */
export const MODEL = process.env.SFTD_TEST_MODEL || 'sftd-demo';
export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
export const CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'];

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A free TCP port on 127.0.0.1 (listen on 0, read it, close). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** Temporary directories made by this test process, removed when it exits. */
const tempDirs = [];
process.once('exit', () => {
  for (const dir of tempDirs) fs.rmSync(dir, { recursive: true, force: true });
});

export function tempDir(prefix = 'sftd-browser-') {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  tempDirs.push(dir);
  return dir;
}

/** One sftd process; restartable on the same port and data dir. */
export class Server {
  constructor({ env = {}, dataDir = tempDir(), port = null, name = 'sftd' } = {}) {
    this.env = env; this.dataDir = dataDir; this.port = port; this.name = name;
    this.proc = null; this.log = [];
  }
  get url() { return `http://127.0.0.1:${this.port}`; }

  async start() {
    if (!fs.existsSync(BIN)) throw new Error(`sftd binary not found at ${BIN} (build it, or set SFTD_BIN)`);
    if (!this.port) this.port = await freePort();
    const args = (process.env.SFTD_ARGS || 'serve').split(' ').filter(Boolean);
    const logFrom = this.log.length;
    this.proc = spawn(BIN, args, {
      env: {
        ...process.env, RUST_LOG: process.env.RUST_LOG || 'info', NO_COLOR: '1', ...this.env,
        SFTD_ADDR: `127.0.0.1:${this.port}`, SFTD_DATA_DIR: this.dataDir,
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const keep = (d) => { this.log.push(d.toString()); if (this.log.length > 4000) this.log.splice(0, 1000); };
    this.proc.stdout.on('data', keep);
    this.proc.stderr.on('data', keep);
    const exited = new Promise((r) => this.proc.once('exit', (code, sig) => r({ code, sig })));
    this.exited = exited;
    const deadline = Date.now() + 120_000;
    let answeredSince = null;
    while (Date.now() < deadline) {
      const done = await Promise.race([exited, sleep(150).then(() => null)]);
      if (done) throw new Error(`${this.name} exited early (${JSON.stringify(done)}):\n${this.tail()}`);
      // Ours is up when it says so (not merely when something answers on the port: another
      // process could have taken it between freePort() and the bind).
      if (this.log.slice(logFrom).join('').includes(`listening on http://127.0.0.1:${this.port}`)) {
        try {
          const res = await fetch(`${this.url}/healthz`, { signal: AbortSignal.timeout(2000) });
          await res.arrayBuffer();
          return this;
        } catch { /* not up yet */ }
      } else {
        try {
          const res = await fetch(`${this.url}/`, { signal: AbortSignal.timeout(2000) });
          await res.arrayBuffer();
          answeredSince ??= Date.now();
          if (Date.now() - answeredSince > 5000) return this; // a server that logs no address
        } catch { /* not up yet */ }
      }
    }
    throw new Error(`${this.name} did not start within 120 s:\n${this.tail()}`);
  }

  /** SIGTERM (graceful: checkpoint and exit), SIGKILL after `graceMs`. */
  async stop(signal = 'SIGTERM', graceMs = 30_000) {
    if (!this.proc || this.proc.exitCode !== null || this.proc.signalCode) return;
    this.proc.kill(signal);
    const t = setTimeout(() => this.proc.kill('SIGKILL'), graceMs);
    await this.exited;
    clearTimeout(t);
  }

  tail(n = 60) { return this.log.join('').split('\n').slice(-n).join('\n'); }

  async api(p, { method = 'GET', json, body, key } = {}) {
    const headers = { Accept: 'application/json' };
    if (key) headers.Authorization = `Bearer ${key}`;
    if (json !== undefined) headers['Content-Type'] = 'application/json';
    const res = await fetch(`${this.url}${p}`, { method, headers, body: json !== undefined ? JSON.stringify(json) : body });
    const text = await res.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch { data = text; }
    if (!res.ok) throw Object.assign(new Error(`${method} ${p} → ${res.status}: ${text.slice(0, 500)}`), { status: res.status, data });
    return data;
  }

  async upload(file, { key, name } = {}) {
    const fd = new FormData();
    fd.append('purpose', 'fine-tune');
    fd.append('file', new Blob([fs.readFileSync(file)]), name || path.basename(file));
    return this.api('/v1/files', { method: 'POST', body: fd, key });
  }

  /** A small demo-model job (the knobs the tests and screenshot share). */
  async submitDemoJob(hp = {}, { key, validation } = {}) {
    const f = await this.upload(EXAMPLE, { key });
    const body = {
      model: MODEL, training_file: f.id,
      method: { type: 'supervised', supervised: { hyperparameters: { n_epochs: 1, batch_size: 2, max_seq_len: 256, ...hp } } },
    };
    if (validation) body.validation_file = (await this.upload(validation, { key })).id;
    return this.api('/v1/fine_tuning/jobs', { method: 'POST', json: body, key });
  }

  /** All events of a job through the JSON listing (paged with `after`). */
  async events(jobId, { key } = {}) {
    const out = [];
    let after = null;
    for (let i = 0; i < 1000; i++) {
      const q = new URLSearchParams({ limit: '1000' });
      if (after !== null) q.set('after', String(after));
      const page = await this.api(`/v1/fine_tuning/jobs/${jobId}/events?${q}`, { key });
      const data = page?.data || [];
      out.push(...data);
      if (!page?.has_more || !data.length) break;
      const last = data[data.length - 1];
      const next = last.seq ?? (typeof last.id === 'number' ? last.id : null);
      if (next === null || next === after) break;
      after = next;
    }
    return out;
  }
}

export async function launchBrowser() {
  return chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS });
}

/** Wait until `fn()` returns a truthy value (polled), or throw with `what` after `timeoutMs`. */
export async function waitFor(fn, { timeoutMs = 60_000, intervalMs = 100, what = 'condition' } = {}) {
  const deadline = Date.now() + timeoutMs;
  let last;
  while (Date.now() < deadline) {
    try { last = await fn(); if (last) return last; } catch (e) { last = e; }
    await sleep(intervalMs);
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} (last: ${last instanceof Error ? last.message : JSON.stringify(last)})`);
}

/** "1-3,5" → [1, 2, 3, 5]. */
export function parseRanges(text) {
  const out = [];
  for (const part of String(text || '').split(',').filter(Boolean)) {
    const [a, b = a] = part.split('-').map(Number);
    for (let i = a; i <= b; i++) out.push(i);
  }
  return out;
}

/**
 * What a job page shows, read from its DOM: the status badge, the stream state, the chart's
 * distinct loss points and their steps, the last seq processed and the replayed events dropped.
 * Null until the page has them.
 */
export async function jobPageState(page) {
  const raw = await page.evaluate(() => {
    const byId = (id) => document.querySelector(`[data-testid="${id}"]`);
    const chart = byId('chart'); const status = byId('job-status'); const stream = byId('stream-state');
    if (!chart || !status || !stream) return null;
    return {
      points: Number(chart.dataset.points), steps: chart.dataset.steps, status: status.dataset.status ?? null,
      stream: stream.dataset.state, lastSeq: stream.dataset.seq ? Number(stream.dataset.seq) : null,
      duplicates: Number(stream.dataset.duplicates ?? 0),
    };
  });
  return raw && { ...raw, steps: parseRanges(raw.steps) };
}

/** Distinct metrics steps in a job's events, as the server recorded them. */
export function metricSteps(events) {
  const steps = new Set();
  let total = null;
  let records = 0;
  for (const e of events) {
    const d = e?.data || {};
    if (typeof d.train_loss === 'number' && typeof d.step === 'number') {
      records++;
      steps.add(d.step);
      if (typeof d.total_steps === 'number') total = d.total_steps;
    }
  }
  return { steps: [...steps].sort((a, b) => a - b), total, records };
}
