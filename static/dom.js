// DOM helpers shared by the views: an element builder, status badges, two-press buttons and
// preferences kept in localStorage.

export const $ = (sel, root = document) => root.querySelector(sel);

/** Tiny element builder. Text is always text (never HTML), so API strings cannot inject markup. */
export function h(tag, attrs = {}, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'text') el.textContent = v;
    else if (k in el && typeof v !== 'string' && k !== 'list') el[k] = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of kids.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

export function badge(status) {
  const s = String(status || 'unknown');
  return h('span', { class: `badge s-${s.replace(/[^a-z_]/gi, '')}`, 'data-status': s }, s.replace(/_/g, ' '));
}

/** A button that needs a second press within 4 s (no blocking confirm() dialogs). */
export function twoStep(label, armedLabel, action, attrs = {}) {
  let timer = null;
  const btn = h('button', { type: 'button', class: 'danger', ...attrs }, label);
  const disarm = () => { clearTimeout(timer); btn.classList.remove('armed'); btn.textContent = label; };
  btn.addEventListener('click', async () => {
    if (!btn.classList.contains('armed')) {
      btn.classList.add('armed');
      btn.textContent = armedLabel;
      timer = setTimeout(disarm, 4000);
      return;
    }
    disarm();
    btn.disabled = true;
    try { await action(); } finally { btn.disabled = false; }
  });
  return btn;
}

/** localStorage that never throws (storage can be disabled). */
export const prefs = {
  get(k) { try { return localStorage.getItem(k); } catch { return null; } },
  set(k, v) { try { localStorage.setItem(k, v); } catch { /* not kept */ } },
  remove(k) { try { localStorage.removeItem(k); } catch { /* not kept */ } },
};
