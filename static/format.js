// Number, duration and time formatting for people. Pure functions: unit-tested under node.

const DASH = '—';

const isNum = (x) => typeof x === 'number' && Number.isFinite(x);

/** Trim "2.00e-4" → "2e-4", "1.50e-3" → "1.5e-3" and "e+5" → "e5". */
function tidyExp(s) {
  const [m, e] = s.split('e');
  const mant = m.includes('.') ? m.replace(/0+$/, '').replace(/\.$/, '') : m;
  return `${mant}e${e.replace('+', '')}`;
}

/** General metric: 4 significant digits, scientific when tiny or huge (1.23e-4, 3.142, 1.23e5). */
export function fmtNum(x, digits = 4) {
  if (!isNum(x)) return DASH;
  if (x === 0) return '0';
  const a = Math.abs(x);
  if (a < 1e-2 || a >= 1e5) return tidyExp(x.toExponential(digits - 2 < 1 ? 1 : digits - 2));
  const s = x.toPrecision(digits);
  return s.includes('.') ? s.replace(/0+$/, '').replace(/\.$/, '') : s;
}

/** Learning rates: always scientific, 3 significant digits (2e-4, 1.23e-5). */
export function fmtLR(x) {
  if (!isNum(x)) return DASH;
  if (x === 0) return '0';
  return tidyExp(x.toExponential(2));
}

/** Counts with k/M/G suffixes: 950, 12.3k, 4.56M. */
export function fmtCount(x) {
  if (!isNum(x)) return DASH;
  const a = Math.abs(x);
  const units = [[1e12, 'T'], [1e9, 'G'], [1e6, 'M'], [1e3, 'k']];
  for (const [v, u] of units) {
    if (a >= v * 0.9995) {
      const q = x / v;
      const s = Math.abs(q) >= 100 ? q.toFixed(0) : Math.abs(q) >= 10 ? q.toFixed(1) : q.toFixed(2);
      return `${s.includes('.') ? s.replace(/0+$/, '').replace(/\.$/, '') : s}${u}`;
    }
  }
  if (Number.isInteger(x)) return String(x);
  return a >= 10 ? x.toFixed(0) : a >= 1 ? x.toFixed(1) : fmtNum(x, 2);
}

/** Throughput: "12.3k tok/s". */
export function fmtRate(x, unit = 'tok/s') {
  return isNum(x) ? `${fmtCount(x)} ${unit}` : DASH;
}

/** Durations: 42s, 3m 12s, 1h 05m, 2d 3h. */
export function fmtDuration(sec) {
  if (!isNum(sec) || sec < 0) return DASH;
  let s = Math.round(sec);
  if (s < 60) return `${s}s`;
  const d = Math.floor(s / 86400); s -= d * 86400;
  const h = Math.floor(s / 3600); s -= h * 3600;
  const m = Math.floor(s / 60); s -= m * 60;
  if (d > 0) return `${d}d ${h}h`;
  if (h > 0) return `${h}h ${String(m).padStart(2, '0')}m`;
  return `${m}m ${String(s).padStart(2, '0')}s`;
}

/** Bytes: 512 B, 12.3 KB, 4.5 MB. */
export function fmtBytes(n) {
  if (!isNum(n)) return DASH;
  if (n < 1024) return `${n} B`;
  const units = ['KB', 'MB', 'GB', 'TB'];
  let v = n; let i = -1;
  do { v /= 1024; i++; } while (v >= 1024 && i < units.length - 1);
  return `${v >= 100 ? v.toFixed(0) : v.toFixed(1)} ${units[i]}`;
}

/** Unix seconds (or ms, or an ISO string) → a Date, or null. */
export function toDate(t) {
  if (t == null || t === '') return null;
  if (typeof t === 'string' && !/^\d+(\.\d+)?$/.test(t)) {
    const d = new Date(t);
    return Number.isNaN(d.getTime()) ? null : d;
  }
  const n = Number(t);
  if (!Number.isFinite(n) || n <= 0) return null;
  return new Date(n < 1e11 ? n * 1000 : n);
}

/** "2026-11-28 06:12" in local time. */
export function fmtTime(t) {
  const d = toDate(t);
  if (!d) return DASH;
  const p = (x) => String(x).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}`;
}

/** "3m ago" relative to now (ms). */
export function fmtAgo(t, now = Date.now()) {
  const d = toDate(t);
  if (!d) return DASH;
  const s = (now - d.getTime()) / 1000;
  if (s < 5) return 'just now';
  return `${fmtDuration(s).split(' ')[0]} ago`;
}

/** Percentage 0..100 with no more than one decimal. */
export function fmtPct(x) {
  if (!isNum(x)) return DASH;
  return `${x >= 10 || x === 0 ? x.toFixed(0) : x.toFixed(1)}%`;
}

export { DASH, isNum };
