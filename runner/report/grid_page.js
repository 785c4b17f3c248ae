/* lora-sweep grid page: axes, toggles, viewer, compare and score colours over the index inlined in grid.html.
 * No network, no libraries: it works from file://. The index is columnar (see runner/report/grid_page.py):
 * per axis {name, values: [label], codes: [int per image]}; the view's state lives in the URL fragment. */
(function () {
  'use strict';
  const D = JSON.parse(document.getElementById('grid-index').textContent);
  const N = D.n;
  const AX = {};
  D.axes.forEach(function (a) { AX[a.name] = a; });
  const NAMES = D.axes.map(function (a) { return a.name; });
  const STATUS = ['ok', 'failed', 'pending'];
  const S = { x: null, y: null, page: null, pv: null, size: 128, fit: false, hidden: {}, color: '', cmode: 'band', view: null, cmp: null, cview: 'side' };
  let L = null;          // the layout of the current state (see layout())
  let picking = null;    // compare: the first image picked, waiting for the second
  let lastHash = '';
  let rows = null;       // observes the grid's rows: a row near the view gets its cells (empty boxes)
  let cells = null;      // observes those cells: a cell near the view gets its images; far away, loses them again

  // ------------------------------------------------------------ small helpers

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const k in attrs || {}) {
      if (k === 'text') node.textContent = attrs[k];
      else if (k === 'cls') node.className = attrs[k];
      else if (k.slice(0, 2) === 'on') node.addEventListener(k.slice(2), attrs[k]);
      else node.setAttribute(k, attrs[k]);
    }
    (children || []).forEach(function (c) { if (c) node.appendChild(typeof c === 'string' ? document.createTextNode(c) : c); });
    return node;
  }
  const $ = function (id) { return document.getElementById(id); };
  const SYNC_BUILD = new URLSearchParams(location.hash.slice(1)).get('build') === 'sync';  // the old cell building (bench/)
  function label(axis, i) { return AX[axis].values[AX[axis].codes[i]]; }
  function fmt(v) { return v === null || v === undefined ? '–' : Math.abs(v) >= 1000 || Number.isInteger(v) ? String(v) : v.toPrecision(4); }
  function size(i) { return D.size.values[D.size.codes[i]]; }
  function hiddenSet(axis) { return S.hidden[axis] || (S.hidden[axis] = new Set()); }

  // ------------------------------------------------------------ state <-> URL fragment

  function writeHash() {
    const p = new URLSearchParams();
    ['x', 'y', 'page', 'pv'].forEach(function (k) { if (S[k] !== null && S[k] !== undefined) p.set(k, S[k]); });
    p.set('size', String(S.size));
    if (S.fit) p.set('fit', '1');
    Object.keys(S.hidden).forEach(function (a) { S.hidden[a].forEach(function (v) { p.append('hide', a + '=' + v); }); });
    if (S.color) { p.set('color', S.color); p.set('cmode', S.cmode); }
    if (S.view) p.set('view', S.view);
    if (S.cmp) { p.set('cmp', S.cmp.join(',')); p.set('cview', S.cview); }
    lastHash = '#' + p.toString();
    if (location.hash !== lastHash) history.replaceState(null, '', lastHash);
  }

  function readHash() {
    const p = new URLSearchParams(location.hash.slice(1));
    const axis = function (v) { return v && AX[v] ? v : null; };
    const d = D.defaults || {};
    S.x = p.has('x') ? axis(p.get('x')) : axis(d.x);
    S.y = p.has('y') ? axis(p.get('y')) : axis(d.y);
    S.page = p.has('page') ? axis(p.get('page')) : axis(d.page);
    S.pv = p.get('pv');
    S.size = Math.max(24, Math.min(512, parseInt(p.get('size') || '128', 10) || 128));
    S.fit = p.get('fit') === '1';
    S.hidden = {};
    p.getAll('hide').forEach(function (h) {
      const k = h.indexOf('=');
      if (k > 0 && AX[h.slice(0, k)]) hiddenSet(h.slice(0, k)).add(h.slice(k + 1));
    });
    S.color = p.get('color') || '';
    S.cmode = p.get('cmode') === 'heat' ? 'heat' : 'band';
    const id = p.get('view');
    S.view = id && D.ids.indexOf(id) >= 0 ? id : null;
    const cmp = (p.get('cmp') || '').split(',').filter(function (c) { return D.ids.indexOf(c) >= 0; });
    S.cmp = cmp.length === 2 ? cmp : null;
    S.cview = p.get('cview') === 'overlay' ? 'overlay' : 'side';
  }

  // ------------------------------------------------------------ layout: which image goes where

  function visible(i) {
    for (const a in S.hidden) {
      if (S.hidden[a].size && S.hidden[a].has(label(a, i))) return false;
    }
    return true;
  }

  function distinctCodes(axis, items) {
    const seen = new Set();
    const codes = AX[axis].codes;
    for (const i of items) seen.add(codes[i]);
    return Array.from(seen).sort(function (a, b) { return a - b; });
  }

  function keyOf(axes, i) {
    let k = '';
    for (const a of axes) k += AX[a].codes[i] + ',';
    return k;
  }

  /* The other axes that still tell the images of a cell apart (the seed, ...): an axis that the chosen ones
   * already decide (blend given lora_model and lora_strength, scheduler_used given scheduler) is left out. */
  function restAxes(items, chosen) {
    const rest = [];
    const key = chosen.slice();
    for (const a of NAMES) {
      if (key.indexOf(a) >= 0) continue;
      const seen = new Map();
      const codes = AX[a].codes;
      let decided = true;
      for (const i of items) {
        const k = keyOf(key, i);
        const c = seen.get(k);
        if (c === undefined) seen.set(k, codes[i]);
        else if (c !== codes[i]) { decided = false; break; }
      }
      if (!decided) { rest.push(a); key.push(a); }
    }
    return rest;
  }

  function layout() {
    let items = [];
    for (let i = 0; i < N; i++) if (visible(i)) items.push(i);
    let pages = [null];
    if (S.page) {
      pages = distinctCodes(S.page, items);
      const values = AX[S.page].values;
      let pc = pages.find(function (c) { return values[c] === S.pv; });
      if (pc === undefined) pc = pages.length ? pages[0] : null;
      S.pv = pc === null ? null : values[pc];
      const codes = AX[S.page].codes;
      items = items.filter(function (i) { return codes[i] === pc; });
    } else {
      S.pv = null;
    }
    const chosen = [S.x, S.y, S.page].filter(Boolean);
    const rest = restAxes(items, chosen);
    const xs = S.x ? distinctCodes(S.x, items) : [0];
    const ys = S.y ? distinctCodes(S.y, items) : [0];
    const slotKeys = new Map();
    const combos = [];
    for (const i of items) {
      const k = keyOf(rest, i);
      if (!slotKeys.has(k)) { slotKeys.set(k, -1); combos.push(rest.map(function (a) { return AX[a].codes[i]; })); }
    }
    combos.sort(function (p, q) { for (let k = 0; k < p.length; k++) if (p[k] !== q[k]) return p[k] - q[k]; return 0; });
    combos.forEach(function (c, s) { slotKeys.set(c.join(',') + (c.length ? ',' : ''), s); });
    const k = Math.max(1, combos.length);
    const cells = new Map();
    const where = new Int32Array(N).fill(-1);
    let w = 1, h = 1;
    for (const i of items) {
      const xc = S.x ? AX[S.x].codes[i] : 0, yc = S.y ? AX[S.y].codes[i] : 0;
      const ck = xc + ':' + yc;
      let cell = cells.get(ck);
      if (!cell) { cell = new Int32Array(k).fill(-1); cells.set(ck, cell); }
      const slot = slotKeys.get(keyOf(rest, i));
      if (cell[slot] < 0) cell[slot] = i;
      where[i] = slot;
      const wh = size(i);
      w = Math.max(w, wh[0]); h = Math.max(h, wh[1]);
    }
    const sc = k <= 4 ? k : Math.ceil(Math.sqrt(k));
    return { items: items, pages: pages, rest: rest, xs: xs, ys: ys, cells: cells, k: k, sc: sc, sr: Math.ceil(k / sc), combos: combos, where: where, aspect: w / h };
  }

  function thumbBox() {
    let size = S.size;
    if (S.fit) {
      const width = $('scroller').clientWidth - labelWidth() - 24;
      size = Math.floor(width / Math.max(1, L.xs.length) / L.sc - 4);
      size = Math.max(24, Math.min(512, size));
    }
    const tw = L.aspect >= 1 ? size : Math.round(size * L.aspect);
    const th = L.aspect >= 1 ? Math.round(size / L.aspect) : size;
    return [tw, th, size];
  }

  function labelWidth() {
    const names = Math.max(S.x ? S.x.length : 0, S.y ? S.y.length : 0) + 2;
    const longest = S.y ? L.ys.reduce(function (m, c) { return Math.max(m, AX[S.y].values[c].length); }, 0) : 0;
    return Math.min(260, Math.max(60, 7.4 * Math.max(longest, names * 0.85) + 20));
  }

  // ------------------------------------------------------------ scores as colours

  const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  function colour(t) {
    t = Math.max(0, Math.min(1, t)) * (VIRIDIS.length - 1);
    const k = Math.min(VIRIDIS.length - 2, Math.floor(t)), f = t - k;
    const c = VIRIDIS[k].map(function (v, j) { return Math.round(v + f * (VIRIDIS[k + 1][j] - v)); });
    return 'rgb(' + c.join(',') + ')';
  }

  function scoreColumn() {
    if (!S.color) return null;
    const [kind, name] = [S.color.slice(0, S.color.indexOf(':')), S.color.slice(S.color.indexOf(':') + 1)];
    const values = kind === 'image' ? D.scores[name] : kind === 'cell' ? D.cell.columns[name] : null;
    if (!values) return null;
    const finite = values.filter(function (v) { return v !== null; });
    const lo = Math.min.apply(null, finite), hi = Math.max.apply(null, finite);
    const value = kind === 'image' ? function (i) { return values[i]; } : function (i) { const r = D.cell.row[i]; return r >= 0 ? values[r] : null; };
    return { name: name, kind: kind, value: value, lo: lo, hi: hi, t: function (v) { return hi > lo ? (v - lo) / (hi - lo) : 0.5; } };
  }

  function scoreOptions() {
    const options = [el('option', { value: '', text: 'no score colours' })];
    Object.keys(D.scores).forEach(function (c) { options.push(el('option', { value: 'image:' + c, text: c + ' (per image)' })); });
    Object.keys(D.cell.columns).forEach(function (c) { options.push(el('option', { value: 'cell:' + c, text: c + ' (per cell, ranking)' })); });
    return options;
  }

  function legend(col) {
    const box = $('legend');
    box.textContent = '';
    if (!col) return;
    const bar = el('span', { cls: 'ramp' });
    bar.style.background = 'linear-gradient(90deg,' + VIRIDIS.map(function (c) { return 'rgb(' + c.join(',') + ')'; }).join(',') + ')';
    box.append(el('span', { text: fmt(col.lo) }), bar, el('span', { text: fmt(col.hi) }));
  }

  // ------------------------------------------------------------ drawing the grid

  function render() {
    L = layout();
    const [tw, th] = thumbBox();
    const cw = L.sc * (tw + 2) + 6, rh = L.sr * (th + 2) + 6;
    const grid = $('grid');
    grid.textContent = '';
    grid.style.setProperty('--tw', tw + 'px');
    grid.style.setProperty('--th', th + 'px');
    grid.style.setProperty('--cw', cw + 'px');
    grid.style.setProperty('--lw', labelWidth() + 'px');
    grid.style.setProperty('--sc', L.sc);
    grid.classList.toggle('small', tw < 64);
    const col = scoreColumn();
    legend(col);
    const corner = el('div', { cls: 'corner' }, [S.x ? S.x + ' →' : '', S.x && S.y ? el('br') : null, S.y ? S.y + ' ↓' : '']);
    const head = el('div', { cls: 'ghead' }, [corner]);
    L.xs.forEach(function (xc) {
      const text = S.x ? AX[S.x].values[xc] : 'all images';
      head.appendChild(el('div', { cls: 'xl', title: text, text: text }));
    });
    grid.appendChild(head);
    if (L.rest.length && L.k > 1) grid.appendChild(el('div', { cls: 'restnote', text: 'each cell: ' + L.rest.join(' × ') + ' (' + L.k + ' images, in order)' }));
    if (rows) { rows.disconnect(); cells.disconnect(); }
    building = [];
    const root = $('scroller');
    rows = new IntersectionObserver(onRows, { root: root, rootMargin: '1200px 0px' });
    cells = new IntersectionObserver(onCells, { root: root, rootMargin: SYNC_BUILD ? '700px 500px' : '600px 100px' });
    L.ys.forEach(function (yc) {
      const text = S.y ? AX[S.y].values[yc] : '';
      const row = el('div', { cls: 'grow', 'data-y': yc }, [el('div', { cls: 'yl', title: text, text: text })]);
      row.style.height = rh + 'px';
      grid.appendChild(row);
      rows.observe(row);
    });
    L.col = col;
    L.tw = tw; L.th = th;
    renderPageNav();
    renderStats();
    if (!L.items.length) grid.appendChild(el('p', { cls: 'empty', text: 'No images: every value of some axis is hidden (use "all" to show them again).' }));
    writeHash();
  }

  /* Only what is near the view is in the page: rows get their cells as boxes of a fixed size, cells their
   * images; both are emptied again when they are far away, so a long scroll does not pile up nodes. */
  function onRows(entries) {
    for (const entry of entries) {
      const row = entry.target;
      if (entry.isIntersecting && !row.dataset.filled) {
        row.dataset.filled = '1';
        const yc = Number(row.dataset.y);
        const frag = document.createDocumentFragment();
        for (const xc of L.xs) {
          const node = el('div', { cls: 'gcell', 'data-x': xc });
          if (!L.cells.get(xc + ':' + yc)) node.classList.add('absent');
          else cells.observe(node);
          frag.appendChild(node);
        }
        row.appendChild(frag);
      } else if (!entry.isIntersecting && row.dataset.filled) {
        delete row.dataset.filled;
        row.querySelectorAll('.gcell').forEach(function (c) { cells.unobserve(c); c.remove(); });
      }
    }
  }

  function onCells(entries) {
    for (const entry of entries) {
      const node = entry.target;
      if (entry.isIntersecting && !node.dataset.filled) {
        node.dataset.filled = '1';
        if (SYNC_BUILD) fillCell(node, L.k);
        else queueCell(node, entry.boundingClientRect, entry.rootBounds);
      } else if (!entry.isIntersecting && node.dataset.filled) {
        delete node.dataset.filled;
        delete node.dataset.built;
        delete node.dataset.complete;
        node.textContent = '';
      }
    }
  }

  /* A cell's images are built a few at a time, nearest cells first, within a budget per animation frame that adapts
   * to the frames: halved after a slow frame, grown after a quick one, smaller while the grid scrolls. A cell of 100
   * images built at once made frames of 100-270 ms (100 image loads started in one microtask checkpoint, and all of
   * them painted and layerized in one frame). Cells fill 100 px left and right of the view, not 500 (a column of
   * 100-image cells outside the view was loaded for nothing), their images load as they are built (lazy loading
   * started them in bursts of its own), and slots are not clipped, positioned boxes (a paint layer and clip each).
   * `#build=sync` keeps the old way, for bench/ to compare. */
  const SLOTS_PER_FRAME = { least: 1, scrolling: 12, resting: 60 };
  const SLOW_FRAME_MS = 20;
  const BUILD_BUDGET_MS = 6;
  let building = [];     // cells in range still waiting for images: [node, distance to the view]
  let buildFrame = 0;
  let lastFrameAt = 0;
  let slotsPerFrame = SLOTS_PER_FRAME.resting;
  let scrolledAt = -1e9;

  function queueCell(node, box, view) {
    const cx = (box.left + box.right) / 2, cy = (box.top + box.bottom) / 2;
    const vx = view ? (view.left + view.right) / 2 : 0, vy = view ? (view.top + view.bottom) / 2 : 0;
    building.push([node, Math.abs(cx - vx) + Math.abs(cy - vy)]);
    building.sort(function (a, b) { return a[1] - b[1]; });
    if (!buildFrame) buildFrame = requestAnimationFrame(buildSome);
  }

  function buildSome(now) {
    buildFrame = 0;
    const start = performance.now();
    let left = adaptRate(now);
    while (building.length && left > 0 && performance.now() - start < BUILD_BUDGET_MS) {
      const node = building[0][0];
      if (!node.isConnected || !node.dataset.filled) { building.shift(); continue; }  // emptied or gone meanwhile
      left -= fillCell(node, left);
      if (Number(node.dataset.built) >= L.k) building.shift();
    }
    if (building.length) buildFrame = requestAnimationFrame(buildSome);
  }

  /* Slots for this frame: half as many after a slow frame, two more after a quick one, within the scroll's cap. */
  function adaptRate(now) {
    const gap = now - lastFrameAt;
    lastFrameAt = now;
    const cap = now - scrolledAt < 150 ? SLOTS_PER_FRAME.scrolling : SLOTS_PER_FRAME.resting;
    if (gap < 200) slotsPerFrame = gap > SLOW_FRAME_MS ? slotsPerFrame / 2 : slotsPerFrame + 2;  // else: the first frame of a build
    slotsPerFrame = Math.max(SLOTS_PER_FRAME.least, Math.min(cap, slotsPerFrame));
    return Math.floor(slotsPerFrame);
  }

  /* Up to `count` more of a cell's slots (in order); how many were added. */
  function fillCell(node, count) {
    const cell = L.cells.get(node.dataset.x + ':' + node.parentNode.dataset.y);
    const from = Number(node.dataset.built || 0);
    const to = Math.min(L.k, from + count);
    const frag = document.createDocumentFragment();
    for (let s = from; s < to; s++) frag.appendChild(slotNode(cell[s], s));
    node.appendChild(frag);
    node.dataset.built = String(to);
    if (to >= L.k) node.dataset.complete = '1';
    return to - from;
  }

  function slotNode(i, s) {
    if (i < 0) return el('div', { cls: 'slot none' });
    const status = STATUS[D.status[i]];
    const id = D.ids[i];
    const node = el('div', { cls: 'slot ' + status, 'data-i': i, 'data-id': id, title: slotTitle(i, s) });
    if (status === 'ok') {
      node.appendChild(el('img', { loading: SYNC_BUILD ? 'lazy' : 'eager', decoding: 'async', alt: id, width: L.tw, height: L.th, src: D.thumbs + '/' + id + '.webp' }));
    } else {
      node.appendChild(el('span', { cls: 'tag', text: status === 'failed' ? 'failed' : 'pending' }));
    }
    if (L.col) {
      node.classList.add('marked');
      const v = L.col.value(i);
      const mark = el('div', { cls: L.col.kind === 'cell' && S.cmode === 'band' ? 'band cellband' : S.cmode === 'heat' ? 'heat' : 'band', text: S.cmode === 'heat' && v !== null ? fmt(v) : '' });
      mark.style.background = v === null ? 'transparent' : colour(L.col.t(v));
      node.appendChild(mark);
    }
    if (picking === i) node.classList.add('picked');
    return node;
  }

  /* A thumbnail that cannot be loaded (not made yet, cut short): the PNG itself. One listener for the grid. */
  function onThumbError(event) {
    const img = event.target;
    if (img.tagName !== 'IMG' || img.dataset.fallback || !img.closest('.slot')) return;
    img.dataset.fallback = '1';
    img.src = 'images/' + img.closest('.slot').dataset.id + '.png';
  }

  function slotTitle(i, s) {
    const parts = L.rest.map(function (a) { return a + ' ' + label(a, i); });
    if (L.col) parts.push(L.col.name + ' ' + fmt(L.col.value(i)));
    parts.push(D.ids[i]);
    return parts.join(' · ');
  }

  function renderStats() {
    let ok = 0, failed = 0;
    for (let i = 0; i < N; i++) { if (D.status[i] === 0) ok++; else if (D.status[i] === 1) failed++; }
    const pending = N - ok - failed;
    $('stats').textContent = N + ' images: ' + ok + ' ok' + (failed ? ', ' + failed + ' failed' : '') + (pending ? ', ' + pending + ' pending' : '') + ' · ' + L.items.length + ' shown' + runningNote();
  }

  /* A run killed outright (kill -9, a lost machine) never says it ended: its page would say "running" for ever.
   * The index carries the time it was written; after a quiet spell the page says so, and keeps looking. */
  const QUIET_S = 300;
  function runningNote() {
    if (!D.running) return '';
    const quiet = D.written ? Date.now() / 1000 - D.written : 0;
    document.body.dataset.quiet = quiet >= QUIET_S ? 'yes' : 'no';
    if (quiet < QUIET_S) return ' · running: updates itself';
    return ' · running? nothing new for ' + Math.round(quiet / 60) + ' min (if the run has stopped, `lora-sweep report` on this folder brings the page up to date)';
  }

  function renderPageNav() {
    const nav = $('pagenav');
    nav.textContent = '';
    if (!S.page) return;
    const select = el('select', { id: 'page-value', 'aria-label': 'page', onchange: function () { S.pv = select.value; render(); } });
    L.pages.forEach(function (c) {
      const v = AX[S.page].values[c];
      const o = el('option', { value: v, text: v });
      if (v === S.pv) o.selected = true;
      select.appendChild(o);
    });
    nav.append(
      el('button', { text: '‹', title: 'previous page ([)', onclick: function () { stepPage(-1); } }),
      select,
      el('button', { text: '›', title: 'next page (])', onclick: function () { stepPage(1); } }),
      el('span', { cls: 'muted', text: (L.pages.length ? L.pages.map(function (c) { return AX[S.page].values[c]; }).indexOf(S.pv) + 1 : 0) + ' of ' + L.pages.length })
    );
  }

  function stepPage(dir) {
    if (!S.page || !L.pages.length) return;
    const values = L.pages.map(function (c) { return AX[S.page].values[c]; });
    const k = Math.max(0, Math.min(values.length - 1, values.indexOf(S.pv) + dir));
    S.pv = values[k];
    render();
  }

  // ------------------------------------------------------------ controls

  function axisSelect(id, key, optional) {
    const select = el('select', { id: id, 'aria-label': key + ' axis' });
    if (optional) select.appendChild(el('option', { value: '', text: key === 'page' ? 'no pages' : 'none' }));
    NAMES.forEach(function (n) { select.appendChild(el('option', { value: n, text: n + ' (' + AX[n].values.length + ')' })); });
    select.value = S[key] || '';
    select.addEventListener('change', function () {
      const v = select.value || null;
      ['x', 'y', 'page'].forEach(function (other) { if (other !== key && S[other] === v && v) S[other] = S[key]; });
      S[key] = v;
      syncControls();
      renderToggles();
      render();
    });
    return select;
  }

  function syncControls() {
    $('ax-x').value = S.x || '';
    $('ax-y').value = S.y || '';
    $('ax-page').value = S.page || '';
    $('size').value = S.size;
    $('size-value').textContent = S.fit ? 'fit' : S.size + ' px';
    $('fit').setAttribute('aria-pressed', S.fit ? 'true' : 'false');
    $('color').value = S.color;
    $('cmode').value = S.cmode;
    $('cmode').disabled = !S.color;
  }

  function renderToggles() {
    const box = $('toggles');
    box.textContent = '';
    NAMES.forEach(function (a) {
      const role = a === S.x ? 'x' : a === S.y ? 'y' : a === S.page ? 'page' : '';
      const chips = el('div', { cls: 'chips' });
      AX[a].values.forEach(function (v) {
        const on = !hiddenSet(a).has(v);
        chips.appendChild(el('button', { cls: 'chip', 'aria-pressed': on ? 'true' : 'false', 'data-axis': a, 'data-value': v, title: v, text: v }));
      });
      box.appendChild(el('div', { cls: 'togglerow', 'data-axis': a }, [
        el('span', { cls: 'axisname', text: a }, role ? [el('em', { text: ' ' + role })] : []),
        el('button', { cls: 'all', 'data-axis': a, text: 'all' }),
        el('button', { cls: 'nonebtn', 'data-axis': a, text: 'none' }),
        chips,
      ]));
    });
  }

  function onToggle(event) {
    const b = event.target.closest('button');
    if (!b) return;
    const a = b.dataset.axis;
    if (b.classList.contains('chip')) {
      const set = hiddenSet(a);
      if (set.has(b.dataset.value)) set.delete(b.dataset.value); else set.add(b.dataset.value);
      b.setAttribute('aria-pressed', set.has(b.dataset.value) ? 'false' : 'true');
    } else if (b.classList.contains('all') || b.classList.contains('nonebtn')) {
      S.hidden[a] = b.classList.contains('all') ? new Set() : new Set(AX[a].values);
      b.parentNode.querySelectorAll('.chip').forEach(function (c) { c.setAttribute('aria-pressed', b.classList.contains('all') ? 'true' : 'false'); });
    } else {
      return;
    }
    if (!S.hidden[a].size) delete S.hidden[a];
    render();
  }

  function buildChrome() {
    const bar = el('header', { id: 'bar' }, [
      el('div', { cls: 'titlebar' }, [
        el('h1', { text: D.name }),
        el('span', { id: 'stats', cls: 'muted' }),
        el('a', { href: 'report.html', text: 'report' }),
        el('button', { id: 'compare-btn', title: 'pick two images to compare (or shift-click them; c in the viewer)', text: 'compare…' }),
        el('button', { id: 'toggle-filters', 'aria-expanded': 'true', text: 'values ▾' }),
      ]),
      el('div', { cls: 'controls' }, [
        el('label', {}, ['x ', axisSelect('ax-x', 'x', true)]),
        el('label', {}, ['y ', axisSelect('ax-y', 'y', true)]),
        el('label', {}, ['page ', axisSelect('ax-page', 'page', true)]),
        el('span', { id: 'pagenav' }),
        el('label', {}, ['size ', el('input', { id: 'size', type: 'range', min: 24, max: 512, step: 4 }), el('span', { id: 'size-value', cls: 'muted' })]),
        el('button', { id: 'fit', 'aria-pressed': 'false', text: 'fit to width' }),
        el('label', {}, ['colour ', el('select', { id: 'color', 'aria-label': 'score colours' }, scoreOptions())]),
        el('select', { id: 'cmode', 'aria-label': 'colour style' }, [el('option', { value: 'band', text: 'band' }), el('option', { value: 'heat', text: 'heatmap' })]),
        el('span', { id: 'legend' }),
      ]),
      el('div', { id: 'toggles' }),
      el('div', { id: 'hint', role: 'status' }),
    ]);
    const main = el('main', { id: 'scroller', tabindex: '-1' }, [el('div', { id: 'grid' })]);
    main.addEventListener('scroll', function () { scrolledAt = performance.now(); }, { passive: true });
    document.body.append(bar, main, viewerNode(), compareNode());
    $('toggles').addEventListener('click', onToggle);
    $('toggle-filters').addEventListener('click', function () {
      const open = $('toggles').classList.toggle('closed');
      this.setAttribute('aria-expanded', open ? 'false' : 'true');
    });
    $('size').addEventListener('input', function () { S.size = Number(this.value); S.fit = false; syncControls(); render(); });
    $('fit').addEventListener('click', function () { S.fit = !S.fit; syncControls(); render(); });
    $('color').addEventListener('change', function () { S.color = this.value; syncControls(); render(); });
    $('cmode').addEventListener('change', function () { S.cmode = this.value; render(); });
    $('compare-btn').addEventListener('click', function () { startPicking(null); });
    $('grid').addEventListener('click', onGridClick);
    $('grid').addEventListener('error', onThumbError, true);  // error does not bubble: caught on its way down
    document.body.classList.toggle('sync-build', SYNC_BUILD);
    window.addEventListener('resize', function () { if (S.fit) render(); });
  }

  // ------------------------------------------------------------ stepping: the image next along an axis

  /* The image at the same place but one value further along x, y or a cell's axis (seed): the first that
   * exists in that direction; `wrap` goes round (seeds); at the edge it stays (arrows then go on to the next page). */
  function neighbour(i, axis, dir, wrap) {
    if (!L || L.where[i] < 0 || !axis) return i;
    const xc = S.x ? AX[S.x].codes[i] : 0, yc = S.y ? AX[S.y].codes[i] : 0;
    const combo = L.combos[L.where[i]] || [];
    if (axis === S.x || axis === S.y) {
      const list = axis === S.x ? L.xs : L.ys;
      let k = list.indexOf(axis === S.x ? xc : yc);
      for (let step = 0; step < list.length; step++) {
        k += dir;
        if (wrap) k = (k + list.length) % list.length; else if (k < 0 || k >= list.length) return i;
        const cell = L.cells.get(axis === S.x ? list[k] + ':' + yc : xc + ':' + list[k]);
        const j = cell ? cell[L.where[i]] : -1;
        if (j >= 0) return j;
      }
      return i;
    }
    const r = L.rest.indexOf(axis);
    if (r < 0) return i;
    const cell = L.cells.get(xc + ':' + yc);
    const options = [];
    L.combos.forEach(function (c, s) {
      if (cell[s] >= 0 && c.every(function (v, k) { return k === r || v === combo[k]; })) options.push([c[r], cell[s]]);
    });
    options.sort(function (p, q) { return p[0] - q[0]; });
    let k = options.findIndex(function (o) { return o[1] === i; }) + dir;
    if (wrap) k = (k + options.length) % options.length; else if (k < 0 || k >= options.length) return i;
    return options[k][1];
  }

  /* An arrow at a page's last (first) x or y value goes on to the next (previous) page: to the first (last) cell
   * along that axis in the same row or column, at the same seed where that page has them. */
  function acrossPages(i, axis, dir) {
    if (!axis || !S.page || (axis !== S.x && axis !== S.y) || !L.pages.length) return i;
    const values = L.pages.map(function (c) { return AX[S.page].values[c]; });
    const k = values.indexOf(S.pv) + dir;
    if (k < 0 || k >= values.length) return i;
    const across = axis === S.x ? S.y : S.x;
    const keep = across ? AX[across].codes[i] : 0;
    const place = { rest: L.rest.join(), combo: (L.combos[L.where[i]] || []).join() };
    S.pv = values[k];
    render();
    return pageEntry(axis, dir, keep, place);
  }

  function pageEntry(axis, dir, keep, place) {
    const list = axis === S.x ? L.xs : L.ys;
    const order = dir > 0 ? list : list.slice().reverse();
    const cellsInOrder = order.map(function (c) { return L.cells.get(axis === S.x ? c + ':' + keep : keep + ':' + c); }).filter(Boolean);
    const slot = place.rest === L.rest.join() ? L.combos.findIndex(function (c) { return c.join() === place.combo; }) : -1;
    for (const cell of cellsInOrder) if (slot >= 0 && cell[slot] >= 0) return cell[slot];
    for (const cell of cellsInOrder) for (const j of cell) if (j >= 0) return j;
    return dir > 0 ? L.items[0] : L.items[L.items.length - 1];
  }

  function seedAxis() {
    if (AX.seed) return 'seed';
    return L && L.rest.length ? L.rest[0] : null;
  }

  // ------------------------------------------------------------ the viewer

  function viewerNode() {
    return el('div', { id: 'viewer', cls: 'modal', hidden: '', role: 'dialog', 'aria-modal': 'true', 'aria-label': 'image' }, [
      el('div', { cls: 'panel' }, [
        el('figure', { cls: 'vimg' }, [el('img', { id: 'vimage', alt: '' }), el('div', { id: 'vmissing', cls: 'vmissing' })]),
        el('aside', {}, [
          el('button', { cls: 'close', title: 'close (Esc)', text: '×', onclick: closeModal }),
          el('h2', { id: 'vtitle' }),
          el('p', { id: 'vid' }),
          el('table', { id: 'vaxes', cls: 'kv' }),
          el('table', { id: 'vscores', cls: 'kv' }),
          el('details', {}, [el('summary', { text: 'all parameters' }), el('table', { id: 'vconst', cls: 'kv' })]),
          el('p', { id: 'vlinks' }),
          el('p', { cls: 'keys', text: '← → x · ↑ ↓ y (at the edge: on to the next page) · s / S seed · c compare · Esc close' }),
        ]),
      ]),
    ]);
  }

  function kvRows(table, rows) {
    table.textContent = '';
    rows.forEach(function (r) {
      const tr = el('tr', r[2] ? { cls: r[2] } : {}, [el('th', { text: r[0] }), el('td', { text: r[1] })]);
      table.appendChild(tr);
    });
  }

  function openViewer(i) {
    S.view = D.ids[i];
    const id = D.ids[i], status = STATUS[D.status[i]];
    const v = $('viewer');
    v.hidden = false;
    v.dataset.id = id;
    v.dataset.i = i;
    const img = $('vimage');
    const missing = $('vmissing');
    if (status === 'ok') {
      img.hidden = false; missing.hidden = true;
      img.src = 'images/' + id + '.png';
      img.alt = id;
      img.style.aspectRatio = size(i)[0] + ' / ' + size(i)[1];
    } else {
      img.hidden = true; img.removeAttribute('src'); missing.hidden = false;
      missing.textContent = status === 'failed' ? 'failed: ' + (D.errors[i] || 'see report.html') : 'not generated yet (pending)';
    }
    $('vtitle').textContent = [S.x && S.x + ' ' + label(S.x, i), S.y && S.y + ' ' + label(S.y, i)].filter(Boolean).join(' · ') || id;
    $('vid').textContent = '';
    $('vid').append(el('code', { text: id }), ' ', el('span', { cls: 'badge ' + status, text: status }));
    kvRows($('vaxes'), NAMES.map(function (a) { return [a, label(a, i), a === S.x || a === S.y || a === S.page ? 'on-axis' : '']; }));
    const scores = Object.keys(D.scores).map(function (c) { return [c, fmt(D.scores[c][i])]; });
    const r = D.cell.row[i];
    if (r !== undefined && r >= 0) {
      scores.push(['cell', D.cell.cells[r], 'cellhead']);
      Object.keys(D.cell.columns).forEach(function (c) { scores.push([c, fmt(D.cell.columns[c][r])]); });
    }
    kvRows($('vscores'), scores);
    kvRows($('vconst'), Object.keys(D.constants).map(function (k) { return [k, D.constants[k]]; }));
    const links = $('vlinks');
    links.textContent = '';
    if (status === 'ok') links.append(el('a', { href: 'images/' + id + '.png', target: '_blank', text: 'full PNG' }), ' · ');
    const m = D.mlflow;
    if (m && m.run[i]) {
      links.append(el('a', { id: 'vmlflow', href: m.host + '/#/experiments/' + m.experiments[m.experiment[i]] + '/runs/' + m.run[i], target: '_blank', title: 'needs: ' + m.ui, text: 'MLflow run' }), ' · ');
    }
    links.append(el('code', { text: 'lora-sweep reproduce ' + id }));
    writeHash();
  }

  function closeModal() {
    $('viewer').hidden = true;
    $('compare').hidden = true;
    S.view = null;
    S.cmp = null;
    writeHash();
  }

  // ------------------------------------------------------------ compare two cells

  function compareNode() {
    return el('div', { id: 'compare', cls: 'modal', hidden: '', role: 'dialog', 'aria-modal': 'true', 'aria-label': 'compare' }, [
      el('div', { cls: 'panel cpanel' }, [
        el('div', { cls: 'ctools' }, [
          el('button', { id: 'cv-side', 'data-view': 'side', text: 'side by side' }),
          el('button', { id: 'cv-overlay', 'data-view': 'overlay', text: 'overlay' }),
          el('input', { id: 'cmp-slider', type: 'range', min: 0, max: 100, value: 50, 'aria-label': 'overlay position' }),
          el('span', { cls: 'keys', text: 'f flip · m side/overlay · s / S seed · Esc close' }),
          el('button', { cls: 'close', title: 'close (Esc)', text: '×', onclick: closeModal }),
        ]),
        el('div', { id: 'cside', cls: 'cside' }),
        el('div', { id: 'coverlay', cls: 'coverlay' }),
        el('div', { id: 'cdiff', cls: 'cdiff' }),
      ]),
    ]);
  }

  function startPicking(first) {
    picking = first;
    $('hint').textContent = first === null ? 'compare: click the first image (Esc cancels)' : 'compare: now click a second cell (the same seed is taken; Esc cancels)';
    document.body.classList.add('picking');
    document.querySelectorAll('.slot.picked').forEach(function (s) { s.classList.remove('picked'); });
    if (first !== null) document.querySelectorAll('.slot[data-i="' + first + '"]').forEach(function (s) { s.classList.add('picked'); });
  }

  function stopPicking() {
    picking = null;
    $('hint').textContent = '';
    document.body.classList.remove('picking');
    document.querySelectorAll('.slot.picked').forEach(function (s) { s.classList.remove('picked'); });
  }

  /* The second image: in the clicked cell, the one at the first image's place (same seed and other cell axes). */
  function partner(a, clicked) {
    if (!L || L.where[a] < 0 || L.where[clicked] < 0) return clicked;
    const cell = L.cells.get((S.x ? AX[S.x].codes[clicked] : 0) + ':' + (S.y ? AX[S.y].codes[clicked] : 0));
    const j = cell ? cell[L.where[a]] : -1;
    return j >= 0 ? j : clicked;
  }

  function openCompare(a, b) {
    S.cmp = [D.ids[a], D.ids[b]];
    S.view = null;
    $('viewer').hidden = true;
    const c = $('compare');
    c.hidden = false;
    c.dataset.a = D.ids[a];
    c.dataset.b = D.ids[b];
    const differ = NAMES.filter(function (n) { return label(n, a) !== label(n, b); });
    const caption = function (i) { return differ.map(function (n) { return n + ' ' + label(n, i); }).join(' · ') || 'the same parameters'; };
    const figure = function (i, which) {
      return el('figure', { cls: 'cfig', 'data-id': D.ids[i] }, [
        compareImage(i, which),
        el('figcaption', {}, [el('b', { text: which + ' ' }), caption(i), el('br'), el('code', { text: D.ids[i] })]),
      ]);
    };
    const side = $('cside');
    side.textContent = '';
    side.append(figure(a, 'A'), figure(b, 'B'));
    const over = $('coverlay');
    over.textContent = '';
    const stack = el('div', { cls: 'stack' }, [
      compareImage(a, 'A'), compareImage(b, 'B'), el('div', { cls: 'divider' }), el('span', { cls: 'which wa', text: 'A' }), el('span', { cls: 'which wb', text: 'B' }),
    ]);
    stack.style.aspectRatio = size(a)[0] + ' / ' + size(a)[1];
    over.append(stack, el('p', { cls: 'muted', text: 'A (left of the line): ' + caption(a) + ' — B (right): ' + caption(b) }));
    const scores = Object.keys(D.scores).map(function (s) { return s + ' ' + fmt(D.scores[s][a]) + ' / ' + fmt(D.scores[s][b]); });
    $('cdiff').textContent = scores.length ? 'scores A / B: ' + scores.join(' · ') : '';
    setCompareView(S.cview);
    writeHash();
  }

  function compareImage(i, which) {
    if (STATUS[D.status[i]] !== 'ok') return el('div', { cls: 'vmissing', text: which + ': ' + STATUS[D.status[i]] });
    return el('img', { cls: 'cimg ' + which, src: 'images/' + D.ids[i] + '.png', alt: which + ' ' + D.ids[i] });
  }

  function setCompareView(view) {
    S.cview = view;
    $('cside').hidden = view !== 'side';
    $('coverlay').hidden = view !== 'overlay';
    $('cv-side').setAttribute('aria-pressed', view === 'side' ? 'true' : 'false');
    $('cv-overlay').setAttribute('aria-pressed', view === 'overlay' ? 'true' : 'false');
    $('cmp-slider').hidden = view !== 'overlay';
    applySlider();
    writeHash();
  }

  function applySlider() {
    const p = Number($('cmp-slider').value);
    const b = document.querySelector('#coverlay .cimg.B');
    if (b) b.style.clipPath = 'inset(0 0 0 ' + p + '%)';
    const line = document.querySelector('#coverlay .divider');
    if (line) line.style.left = p + '%';
    $('compare').dataset.slider = String(p);
  }

  function compareIndices() { return S.cmp ? S.cmp.map(function (id) { return D.ids.indexOf(id); }) : null; }

  // ------------------------------------------------------------ clicks and keys

  function onGridClick(event) {
    const slot = event.target.closest('.slot[data-i]');
    if (!slot) return;
    const i = Number(slot.dataset.i);
    if (event.shiftKey && picking === null && !document.body.classList.contains('picking')) { startPicking(i); return; }
    if (document.body.classList.contains('picking')) {
      if (picking === null) { startPicking(i); return; }
      if (i === picking) return;
      const a = picking;
      stopPicking();
      openCompare(a, partner(a, i));
      return;
    }
    openViewer(i);
  }

  function onKey(event) {
    const key = event.key;
    if (!$('compare').hidden) return compareKey(event);
    if (!$('viewer').hidden) return viewerKey(event);
    if (event.target.closest && event.target.closest('input, select, textarea') && key !== 'Escape') return;
    if (key === 'Escape' && document.body.classList.contains('picking')) stopPicking();
    else if (key === '[' || key === ']') stepPage(key === ']' ? 1 : -1);
  }

  function viewerKey(event) {
    const i = Number($('viewer').dataset.i);
    const moves = { ArrowRight: [S.x, 1, false], ArrowLeft: [S.x, -1, false], ArrowDown: [S.y, 1, false], ArrowUp: [S.y, -1, false], s: [seedAxis(), 1, true], S: [seedAxis(), -1, true] };
    const move = moves[event.key];
    if (event.key === 'Escape') closeModal();
    else if (move) {
      const next = neighbour(i, move[0], move[1], move[2]);
      openViewer(next === i && !move[2] ? acrossPages(i, move[0], move[1]) : next);
    }
    else if (event.key === 'c') { closeModal(); startPicking(i); }
    else return;
    event.preventDefault();
  }

  function compareKey(event) {
    const [a, b] = compareIndices();
    const slider = $('cmp-slider');
    if (event.key === 'Escape') closeModal();
    else if (event.key === 'f') { if (S.cview !== 'overlay') setCompareView('overlay'); slider.value = Number(slider.value) > 50 ? 0 : 100; applySlider(); }
    else if (event.key === 'm') setCompareView(S.cview === 'side' ? 'overlay' : 'side');
    else if (event.key === 's' || event.key === 'S') {
      const dir = event.key === 's' ? 1 : -1;
      const na = neighbour(a, seedAxis(), dir, true);
      openCompare(na, partner(na, b));
    } else return;
    event.preventDefault();
  }

  // ------------------------------------------------------------ a running sweep: grid-live.js

  /* While the index says the sweep runs, the page loads grid-live.js (the sweep rewrites it as images land) again
   * every few seconds through a <script> tag: fetch() of a file is blocked from file://, a script is not. Its index's
   * statuses, scores and ranking replace ours and only the slots that changed are drawn again, so the axes, hidden
   * values, scroll position and an open viewer stay as they are. A finished sweep's index stops the polling. */
  const LIVE_EVERY_MS = 2000;
  let liveTimer = 0;

  function startLive() {
    window.gridLive = applyLive;
    document.body.dataset.live = D.running ? 'polling' : 'off';
    if (D.running) liveTimer = setTimeout(pollLive, LIVE_EVERY_MS);
  }

  function pollLive() {
    liveTimer = 0;
    const script = document.createElement('script');
    script.src = 'grid-live.js?t=' + Date.now();
    script.onload = script.onerror = function () {
      script.remove();
      if (D.running && !liveTimer) liveTimer = setTimeout(pollLive, LIVE_EVERY_MS);
    };
    document.head.appendChild(script);
  }

  function applyLive(next) {
    if (!samePlan(next)) { reloadForPlan(next); return; }
    const changed = changedImages(next);
    const colours = S.color && JSON.stringify(colourData(D)) !== JSON.stringify(colourData(next));
    const options = Object.keys(D.scores).join() !== Object.keys(next.scores).join() || Object.keys(D.cell.columns).join() !== Object.keys(next.cell.columns).join();
    ['status', 'errors', 'scores', 'cell', 'mlflow', 'running', 'written'].forEach(function (k) { D[k] = next[k]; });
    if (options) { $('color').replaceChildren(...scoreOptions()); syncControls(); }
    if (colours || options) { L.col = scoreColumn(); legend(L.col); }
    redrawSlots(colours ? null : changed);
    renderStats();
    refreshModal(changed, colours || options);
    document.body.dataset.liveUpdates = String(Number(document.body.dataset.liveUpdates || 0) + 1);
    if (!D.running) document.body.dataset.live = 'finished';
  }

  function samePlan(next) {
    if (next.n !== N) return false;
    for (let i = 0; i < N; i++) if (next.ids[i] !== D.ids[i]) return false;
    return true;
  }

  /* New rows in the plan (a search's next trials): grid.html has been written again, so load it (the view is in
   * the URL; the scroll position is kept for the reload), once per plan. */
  function reloadForPlan(next) {
    const plan = next.n + ':' + next.ids[next.n - 1];
    try {
      if (sessionStorage.getItem('grid-plan') === plan) return;
      sessionStorage.setItem('grid-plan', plan);
      sessionStorage.setItem('grid-scroll', JSON.stringify([$('scroller').scrollLeft, $('scroller').scrollTop]));
    } catch (e) {
      return;  // no storage here: without the once-per-plan guard, no reload either (a reload shows the new plan)
    }
    location.reload();
  }

  function restoreScroll() {
    let kept = null;
    try { kept = sessionStorage.getItem('grid-scroll'); sessionStorage.removeItem('grid-scroll'); } catch (e) { return; }
    if (!kept) return;
    const [left, top] = JSON.parse(kept);
    $('scroller').scrollTo(left, top);
  }

  function changedImages(next) {
    const changed = new Set();
    for (let i = 0; i < N; i++) if (next.status[i] !== D.status[i] || next.errors[i] !== D.errors[i]) changed.add(i);
    return changed;
  }

  function colourData(index) {
    const kind = S.color.slice(0, S.color.indexOf(':')), name = S.color.slice(S.color.indexOf(':') + 1);
    return kind === 'image' ? index.scores[name] : [index.cell.columns[name], index.cell.row];
  }

  /* The built slots of the changed images (all of them when the colours changed) made again, in place. */
  function redrawSlots(changed) {
    $('grid').querySelectorAll('.slot[data-i]').forEach(function (node) {
      const i = Number(node.dataset.i);
      if (!changed || changed.has(i)) node.replaceWith(slotNode(i, L.where[i]));
    });
  }

  function refreshModal(changed, all) {
    const cmp = compareIndices();
    if (!$('compare').hidden && cmp && (all || changed.has(cmp[0]) || changed.has(cmp[1]))) openCompare(cmp[0], cmp[1]);
    if (!$('viewer').hidden) openViewer(Number($('viewer').dataset.i));  // its scores may be new too
  }

  // ------------------------------------------------------------ start

  function openFromState() {
    const cmp = compareIndices();
    if (cmp) openCompare(cmp[0], cmp[1]);
    else if (S.view) openViewer(D.ids.indexOf(S.view));
    else { $('viewer').hidden = true; $('compare').hidden = true; }
  }

  function start() {
    const t0 = performance.now();
    readHash();
    buildChrome();
    syncControls();
    renderToggles();
    render();
    restoreScroll();
    openFromState();
    startLive();
    document.addEventListener('keydown', onKey);
    $('cv-side').addEventListener('click', function () { setCompareView('side'); });
    $('cv-overlay').addEventListener('click', function () { setCompareView('overlay'); });
    $('cmp-slider').addEventListener('input', applySlider);
    window.addEventListener('hashchange', function () {
      if (location.hash === lastHash) return;
      readHash(); syncControls(); renderToggles(); render(); openFromState();
    });
    document.body.dataset.renderMs = String(Math.round(performance.now() - t0));
    document.body.dataset.readyAt = String(Math.round(performance.now()));  // since navigation start (bench/)
    document.body.dataset.ready = 'yes';
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
