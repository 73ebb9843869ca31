// The job page's loss chart (uPlot): raw and smoothed training loss, eval loss, learning rate and
// grad norm by step, and the tool-call accuracies on their own 0–1 axis once a tool-call
// evaluation has arrived, with a smoothing slider, log scale, drag-to-zoom and keyboard reading.
// The chart element reports what it draws in `data-points` (distinct loss steps), `data-steps`
// (those steps as ranges, e.g. "1-16"), `data-tool-steps` (the steps with tool-call rates) and
// `data-axes` (the axis labels).
/* global uPlot */
import { h, prefs } from './dom.js';
import { fmtNum, fmtLR, fmtCount, fmtRate, fmtPct, DASH } from './format.js';
import { stepRanges } from './series.js';
import { TOOL_RATES } from './vocabulary.js';

const COLORS = { raw: 'rgba(0,114,178,0.45)', smooth: '#0072B2', eval: '#D55E00', lr: '#009E73', gn: '#CC79A7', grid: '#e8eaee', axis: '#3b3b44' };
/** How each of TOOL_RATES is drawn on the accuracy axis. */
const TOOL_STYLE = {
  tool_name_accuracy: { label: 'tool name accuracy', stroke: '#E69F00', width: 2.25 },
  tool_args_exact: { label: 'tool args exact', stroke: '#56B4E9', width: 2 },
  tool_args_valid: { label: 'tool args valid', stroke: '#117733', width: 1.5, dash: [6, 2] },
  tool_json_valid: { label: 'tool JSON valid', stroke: '#6b6b76', width: 1.5, dash: [4, 3] },
  no_call_accuracy: { label: 'no-call accuracy', stroke: '#000000', width: 1.5, dash: [1, 3] },
};

function chartHeight() {
  const w = window.innerWidth;
  return w < 600 ? 260 : Math.max(300, Math.min(440, window.innerHeight - 330));
}

/** `series`: the run's RunSeries; `onDraw(columns)` runs after each redraw. */
export function lossChart(series, { onDraw }) {
  const st = {
    alive: true, chart: null, zoomed: false, cursorIdx: null, drawPending: false,
    smoothing: Number(prefs.get('sftd.smoothing') ?? 0.6), log: prefs.get('sftd.logScale') === '1',
    gradNorm: prefs.get('sftd.gradNorm') === '1', tools: false,
  };
  if (!(st.smoothing >= 0 && st.smoothing < 1)) st.smoothing = 0.6;

  const chartEl = h('div', {
    class: 'chart', 'data-testid': 'chart', tabindex: '0', role: 'img', 'data-points': '0', 'data-steps': '',
    'aria-label': 'Training loss chart. Use the left and right arrow keys to read each step.',
  });
  const chartEmpty = h('div', { class: 'chartempty', 'data-testid': 'chart-empty' }, 'Waiting for the first optimizer step…');
  chartEl.hidden = true;
  const hoverLine = h('div', { class: 'hoverline', 'data-testid': 'hover-readout', 'aria-live': 'off' });
  const smoothOut = h('output', { for: 'smoothing', 'data-testid': 'smoothing-value' }, st.smoothing.toFixed(2));
  const smooth = h('input', {
    id: 'smoothing', type: 'range', min: '0', max: '0.99', step: '0.01', value: String(st.smoothing), 'data-testid': 'smoothing',
    oninput: () => { st.smoothing = Number(smooth.value); smoothOut.textContent = st.smoothing.toFixed(2); prefs.set('sftd.smoothing', String(st.smoothing)); scheduleDraw(); },
  });
  const logBox = h('input', { type: 'checkbox', id: 'logscale', checked: st.log, 'data-testid': 'log-scale', onchange: () => { st.log = logBox.checked; prefs.set('sftd.logScale', st.log ? '1' : '0'); rebuild(); } });
  const gnBox = h('input', { type: 'checkbox', id: 'gradnorm', checked: st.gradNorm, 'data-testid': 'grad-norm', onchange: () => { st.gradNorm = gnBox.checked; prefs.set('sftd.gradNorm', st.gradNorm ? '1' : '0'); rebuild(); } });
  const controls = h('div', { class: 'chartcontrols' },
    h('label', { for: 'smoothing' }, 'Smoothing', smooth, smoothOut),
    h('label', { for: 'logscale' }, logBox, 'Log scale'),
    h('label', { for: 'gradnorm' }, gnBox, 'Grad norm'));
  const card = h('section', { class: 'card chartcard area-chart', 'aria-label': 'Loss chart' }, chartEmpty, chartEl, hoverLine, controls);

  function fmtHover(u, idx) {
    if (idx === null || idx === undefined) { hoverLine.textContent = ''; return; }
    const x = u.data[0][idx];
    const m = series.metrics.get(x); const ev = series.evals.get(x);
    const parts = [`step ${x}`];
    if (m) {
      if (m.epoch !== null) parts.push(`epoch ${fmtNum(m.epoch, 3)}`);
      parts.push(`loss ${fmtNum(m.train_loss)}`);
      const sm = u.data[2][idx];
      if (sm !== null && sm !== undefined) parts.push(`smoothed ${fmtNum(sm)}`);
      parts.push(`lr ${fmtLR(m.learning_rate)}`);
      if (m.grad_norm !== null) parts.push(`grad norm ${fmtNum(m.grad_norm, 3)}`);
      if (m.train_mean_token_accuracy !== null) parts.push(`accuracy ${fmtPct(100 * m.train_mean_token_accuracy)}`);
      if (m.tokens_per_second !== null) parts.push(fmtRate(m.tokens_per_second));
    }
    if (ev) parts.push(`eval loss ${fmtNum(ev.valid_loss)}`);
    const te = series.toolEvals.get(x);
    if (te) {
      for (const f of TOOL_RATES) if (te[f] !== null) parts.push(`${TOOL_STYLE[f].label} ${fmtPct(100 * te[f])}`);
    }
    hoverLine.textContent = parts.join(' · ');
  }

  function options() {
    const fmt = (f) => (u, v) => (v === null || v === undefined ? DASH : f(v));
    const ticks = (f) => (u, vals) => vals.map((v) => (v === null || v === undefined ? '' : f(v)));
    const axisBase = { stroke: COLORS.axis, grid: { stroke: COLORS.grid, width: 1 }, ticks: { stroke: COLORS.grid, width: 1 } };
    const axes = [
      { ...axisBase, label: 'step', labelSize: 20, values: (u, vals) => vals.map((v) => (Number.isInteger(v) ? fmtCount(v) : '')) },
      { ...axisBase, scale: 'loss', label: 'loss', labelSize: 20, size: 56, values: ticks((v) => fmtNum(v, 3)) },
      { ...axisBase, scale: 'lr', side: 1, label: 'learning rate', labelSize: 20, size: 60, grid: { show: false }, values: ticks(fmtLR) },
    ];
    if (st.gradNorm) axes.push({ ...axisBase, scale: 'gn', side: 1, label: 'grad norm', labelSize: 20, size: 50, grid: { show: false }, values: ticks((v) => fmtNum(v, 3)) });
    if (st.tools) axes.push({ ...axisBase, scale: 'acc', side: 1, label: 'tool-call accuracy', labelSize: 20, size: 50, grid: { show: false }, values: ticks((v) => fmtPct(100 * v)) });
    return {
      width: Math.max(280, chartEl.clientWidth || card.clientWidth - 24 || 600),
      height: chartHeight(),
      scales: {
        x: { time: false },
        loss: st.log ? { distr: 3, log: 10 } : { auto: true },
        lr: { auto: true, range: (u, min, max) => [0, max > 0 ? max * 1.05 : 1] },
        gn: { auto: true },
        acc: { auto: false, range: [0, 1] },
      },
      axes,
      series: [
        { label: 'step', value: fmt((v) => String(v)) },
        { label: 'loss (raw)', scale: 'loss', stroke: COLORS.raw, width: 1, spanGaps: true, value: fmt(fmtNum), points: { show: false } },
        { label: 'loss (smoothed)', scale: 'loss', stroke: COLORS.smooth, width: 2.25, spanGaps: true, value: fmt(fmtNum), points: { show: false } },
        { label: 'eval loss', scale: 'loss', stroke: COLORS.eval, width: 2, paths: () => null, value: fmt(fmtNum), points: { show: true, size: 9, width: 2, stroke: COLORS.eval, fill: '#fff' } },
        { label: 'learning rate', scale: 'lr', stroke: COLORS.lr, width: 1.5, dash: [6, 4], spanGaps: true, value: fmt(fmtLR), points: { show: false } },
        { label: 'grad norm', scale: 'gn', stroke: COLORS.gn, width: 1.5, dash: [2, 3], spanGaps: true, show: st.gradNorm, value: fmt((v) => fmtNum(v, 3)), points: { show: false } },
        ...TOOL_RATES.map((f) => ({
          ...TOOL_STYLE[f], scale: 'acc', spanGaps: true, show: st.tools, value: fmt((v) => fmtPct(100 * v)),
          points: { show: true, size: 7, width: 1.5, stroke: TOOL_STYLE[f].stroke, fill: '#fff' },
        })),
      ],
      legend: { live: false },
      cursor: { drag: { x: true, y: false }, points: { size: 7 } },
      hooks: {
        setCursor: [(u) => { st.cursorIdx = u.cursor.idx; fmtHover(u, u.cursor.idx); }],
        setSelect: [(u) => { if (u.select.width > 0) st.zoomed = true; }],
      },
    };
  }

  function rebuild() {
    if (st.chart) { st.chart.destroy(); st.chart = null; }
    st.zoomed = false;
    scheduleDraw();
  }

  function draw() {
    if (!st.alive) return;
    const cols = series.columns(st.smoothing, { positiveOnly: st.log });
    // The accuracy axis appears with the first tool-call evaluation (a new set of axes: rebuild).
    const tools = series.toolEvals.size > 0;
    if (tools !== st.tools && st.chart) { st.chart.destroy(); st.chart = null; st.zoomed = false; }
    st.tools = tools;
    if (series.points > 0 || series.evals.size > 0 || tools) {
      chartEmpty.hidden = true;
      chartEl.hidden = false;
      if (!st.chart) {
        const opts = options();
        st.chart = new uPlot(opts, cols, chartEl);
        chartEl.dataset.axes = opts.axes.map((a) => a.label).join(','); // uPlot draws axes on the canvas
      } else if (st.zoomed) {
        // Keep the user's zoom while new steps arrive.
        const { min, max } = st.chart.scales.x;
        st.chart.setData(cols);
        st.chart.setScale('x', { min, max });
      } else {
        st.chart.setData(cols);
      }
    }
    chartEl.dataset.points = String(series.points);
    chartEl.dataset.steps = stepRanges(series.steps());
    const toolCols = cols.slice(6);
    chartEl.dataset.toolSteps = stepRanges(cols[0].filter((x, i) => toolCols.some((c) => c[i] !== null)));
    onDraw(cols);
  }

  function scheduleDraw() {
    if (st.drawPending) return;
    st.drawPending = true;
    const run = () => { if (!st.drawPending) return; st.drawPending = false; draw(); };
    requestAnimationFrame(run);
    setTimeout(run, 250); // background tabs get no animation frames
  }

  chartEl.addEventListener('dblclick', () => { st.zoomed = false; });

  // Keyboard: arrows move the chart cursor step by step.
  const KEYS = { ArrowLeft: (i) => i - 1, ArrowRight: (i) => i + 1, Home: () => 0, End: (i, n) => n - 1, PageUp: (i) => i - 10, PageDown: (i) => i + 10 };
  chartEl.addEventListener('keydown', (e) => {
    const u = st.chart;
    if (!u || !u.data[0].length || !KEYS[e.key]) return;
    e.preventDefault();
    const xs = u.data[0];
    const n = xs.length;
    let i = Math.max(0, Math.min(n - 1, KEYS[e.key](st.cursorIdx ?? n - 1, n)));
    // Stay inside the visible (possibly zoomed) range.
    const { min, max } = u.scales.x;
    while (i < n - 1 && xs[i] < min) i++;
    while (i > 0 && xs[i] > max) i--;
    const y = u.data[2][i] ?? u.data[3][i];
    u.setCursor({ left: u.valToPos(xs[i], 'x'), top: y === null || y === undefined ? u.bbox.height / (2 * devicePixelRatio) : u.valToPos(y, 'loss') });
  });

  const ro = new ResizeObserver(() => {
    if (!st.chart) return;
    const w = Math.max(280, chartEl.clientWidth);
    const hgt = chartHeight();
    if (Math.abs(st.chart.width - w) > 1 || st.chart.height !== hgt) st.chart.setSize({ width: w, height: hgt });
  });
  ro.observe(card);

  return {
    card,
    scheduleDraw,
    /** The smoothed loss weight in use. */
    get smoothing() { return st.smoothing; },
    /** The run is over: say so when it drew nothing. */
    finished() { if (!st.chart) chartEmpty.textContent = 'No training steps were recorded for this job.'; },
    destroy() { st.alive = false; ro.disconnect(); if (st.chart) st.chart.destroy(); },
  };
}
