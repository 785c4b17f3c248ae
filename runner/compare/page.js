// The voting page of `lora-sweep compare`: two images, a key, the next pair. Nothing is fetched but this server.
(function () {
  'use strict';
  var NAME_KEY = 'lora-sweep-compare-voter';
  var KEYS = { ArrowLeft: 'left', ArrowRight: 'right', ArrowDown: 'tie', ' ': 'skip', u: 'undo', U: 'undo', Backspace: 'undo' };
  // window.loraCompare: the page's state, for a look from the console (and the tests): `acked` holds every vote id
  // the server confirmed (on disk), `history` the votes this page may still undo, `shown` counts the pairs shown
  var state = { pair: null, busy: true, acked: [], history: [], shown: 0 };
  window.loraCompare = state;

  function $(id) { return document.getElementById(id); }
  var voterInput = $('voter');
  voterInput.value = localStorage.getItem(NAME_KEY) || '';

  function voter() { return voterInput.value.trim(); }
  function setState(name) { document.body.dataset.state = name; }
  function status(text) { $('status').textContent = text || ''; }

  function api(path, body) {
    var options = body === undefined ? {} : { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body) };
    return fetch(path, options).then(function (response) {
      return response.json().catch(function () { return {}; }).then(function (data) {
        if (!response.ok) { var failure = new Error(data.error || ('HTTP ' + response.status)); failure.refused = true; throw failure; }
        return data;
      });
    });
  }

  function counts(data) {
    var mine = voter() ? ' · ' + data.yours + ' yours' : '';
    $('counts').textContent = data.votes + (data.votes === 1 ? ' vote' : ' votes') + mine + ' · ' + data.pairs + ' pairs';
  }

  function show(pair) {
    state.pair = pair;
    ['left', 'right'].forEach(function (side) { $(side).classList.remove('picked'); });
    if (!pair) {
      setState('empty');
      $('prompt').textContent = '';
      $('pair').innerHTML = '<p class="empty">Nothing to compare yet: this sweep has no two finished images of one prompt and seed ' +
        'from different cells. Reload when more images are done.</p>';
      state.busy = false;
      return;
    }
    setState('loading');
    $('prompt').textContent = '“' + pair.prompt + '” · seed ' + pair.seed;
    var waiting = 2;
    ['left', 'right'].forEach(function (side) {
      var img = $(side + '-img');
      img.dataset.id = pair[side];
      img.onload = img.onerror = function () {
        waiting -= 1;
        if (waiting === 0 && state.pair === pair) { state.busy = false; state.shown += 1; document.body.dataset.shown = state.shown; setState('ready'); }
      };
      img.src = '/image/' + encodeURIComponent(pair[side]);
    });
  }

  var fade = null;
  function reveal(data) {
    var box = $('reveal');
    clearTimeout(fade);
    box.classList.remove('faded');
    box.innerHTML = '';
    var last = data.revealed;
    function mark(side) { return last.choice === side ? ' ✓' : ''; }
    var parts = last
      ? ['previous pair: left was ', b(last.left), mark('left'), ' · right was ', b(last.right), mark('right'), last.choice === 'tie' ? ' · a tie' : '']
      : [data.undone ? 'vote taken back: choose again' : 'skipped'];
    parts.forEach(function (part) { box.append(part); });
    fade = setTimeout(function () { box.classList.add('faded'); }, 4000);
  }
  function b(text) { var el = document.createElement('b'); el.textContent = text; return el; }

  function failed(error) {
    state.busy = false;
    if (error.refused) { setState('error'); status('refused: ' + error.message); return; }
    setState('offline');
    status('not saved: the server does not answer; press the key again once it is back');
  }

  function act(action) {
    if (state.busy) { return; }
    if (action === 'undo') { return undo(); }
    if (!state.pair) { return; }
    state.busy = true;
    if (action === 'left' || action === 'right') { $(action).classList.add('picked'); }
    api('/api/vote', { left: state.pair.left, right: state.pair.right, choice: action, voter: voter() }).then(function (data) {
      state.history.push(data.vote);
      answered(data);
    }, failed);
  }

  // the server wrote the line (vote or undo): count it, show what the last pair was, move on
  function answered(data) {
    state.acked.push(data.vote);
    document.body.dataset.acked = state.acked.length;
    status('');
    reveal(data);
    counts(data);
    show(data.next);
  }

  function undo() {
    if (!state.history.length) { status('nothing to undo'); return; }
    state.busy = true;
    var last = state.history[state.history.length - 1];
    api('/api/undo', { vote: last, voter: voter() }).then(function (data) {
      state.history.pop();
      answered(data);
    }, failed);
  }

  function load() {
    state.busy = true;
    api('/api/pair?voter=' + encodeURIComponent(voter())).then(function (data) { status(''); counts(data); show(data.pair); }, failed);
  }

  document.addEventListener('keydown', function (event) {
    if (event.target === voterInput) {
      if (event.key === 'Enter' || event.key === 'Escape') { voterInput.blur(); }
      return;
    }
    var action = KEYS[event.key];
    if (!action || event.ctrlKey || event.metaKey || event.altKey) { return; }
    event.preventDefault();
    act(action);
  });
  document.querySelectorAll('[data-action]').forEach(function (button) {
    button.addEventListener('click', function () { button.blur(); act(button.dataset.action); });
  });
  voterInput.addEventListener('change', function () {
    localStorage.setItem(NAME_KEY, voter());
    state.history = [];  // undo is for one's own votes
    load();
  });
  load();
})();
