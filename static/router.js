// Hash routes → views. A view is `(root, ...params) => teardown`; the router tears the current
// one down before it shows the next.

let teardown = null;
let firstRoute = true;

function setNav(which) {
  for (const a of document.querySelectorAll('[data-nav]')) {
    if (a.dataset.nav === which) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
}

/** `routes`: [{pattern, nav, title, view}], tried in order; the last one should match anything. */
export function startRouter(main, routes) {
  const show = () => {
    if (teardown) { try { teardown(); } catch (e) { console.error(e); } teardown = null; }
    main.replaceChildren();
    const hash = location.hash || '#/';
    for (const r of routes) {
      const m = hash.match(r.pattern);
      if (!m) continue;
      document.title = r.title || 'sftd';
      setNav(r.nav || null);
      teardown = r.view(main, ...m.slice(1).map(decodeURIComponent));
      break;
    }
    if (!firstRoute) { window.scrollTo(0, 0); main.focus({ preventScroll: true }); }
    firstRoute = false;
  };
  window.addEventListener('hashchange', show);
  show();
  return show;
}
