// Reeve billing page: balance, buying credits, usage against the tier's limits and the
// history, for the user whose JWT arrives in the URL fragment (#token=...). The token is
// moved to sessionStorage (this tab only) and out of the address bar at once; it is
// sent only as `Authorization: Bearer` to this origin, never in a URL, never logged.
// Plain browser JavaScript, no build step, no external assets.
"use strict";
(function () {
  var TOKEN_KEY = "reeve.billing.token";
  var PENDING_KEY = "reeve.billing.pending";
  var HISTORY_PAGE = 20;
  var POLL_MS = 1500;
  var POLL_GIVE_UP_MS = 3 * 60 * 1000;

  var $ = function (id) { return document.getElementById(id); };
  var token = null;
  var claims = {};
  var balance = null;
  var historyCursor = null;
  var newestEntryId = 0;
  var pollTimer = null;
  var bounds = { min: Number($("amount").min) || 1, max: Number($("amount").max) || 1000 };

  // ---- token ---------------------------------------------------------------------
  function readToken() {
    var match = /(?:^#|&)token=([^&]+)/.exec(location.hash);
    if (match) {
      var fresh = decodeURIComponent(match[1]);
      var previous = sessionStorage.getItem(TOKEN_KEY);
      if (previous && subOf(previous) !== subOf(fresh)) sessionStorage.removeItem(PENDING_KEY);
      sessionStorage.setItem(TOKEN_KEY, fresh);
    }
    // Out of the address bar (and so out of history, bookmarks and screen shares) now.
    var params = new URLSearchParams(location.search);
    var checkout = params.get("checkout");
    params.delete("checkout");
    var query = params.toString();
    history.replaceState(null, "", location.pathname + (query ? "?" + query : ""));
    token = sessionStorage.getItem(TOKEN_KEY);
    claims = token ? decodeClaims(token) : {};
    return checkout;
  }

  function decodeClaims(jwt) {
    try {
      var part = jwt.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      var text = decodeURIComponent(Array.prototype.map.call(atob(part), function (c) {
        return "%" + ("00" + c.charCodeAt(0).toString(16)).slice(-2);
      }).join(""));
      return JSON.parse(text) || {};
    } catch (e) { return {}; }
  }
  function subOf(jwt) { return decodeClaims(jwt).sub; }

  // ---- API -----------------------------------------------------------------------
  function ApiFailure(status, error) {
    this.status = status;
    this.code = (error && error.code) || (status === 0 ? "network" : "http_" + status);
    this.message = (error && error.message) || "";
    this.error = error || {};
  }

  function api(path, options) {
    options = options || {};
    var headers = { "Authorization": "Bearer " + token, "Accept": "application/json" };
    if (options.body) headers["Content-Type"] = "application/json";
    return fetch(path, { method: options.method || "GET", headers: headers, body: options.body, cache: "no-store", credentials: "omit" })
      .catch(function () { throw new ApiFailure(0, null); })
      .then(function (response) {
        if (options.raw && response.ok) return response;
        return response.text().then(function (text) {
          var body = null;
          try { body = text ? JSON.parse(text) : null; } catch (e) { body = null; }
          if (!response.ok) throw new ApiFailure(response.status, body && body.error);
          return body;
        });
      });
  }

  // ---- formatting ----------------------------------------------------------------
  // Exact decimal strings ("12.500000") to "12.50": no float ever touches money.
  function credits(text) {
    if (text === null || text === undefined) return "–";
    var s = String(text), sign = "";
    if (s[0] === "-") { sign = "−"; s = s.slice(1); } else if (s[0] === "+") { s = s.slice(1); }
    var parts = s.split("."), whole = parts[0] || "0", frac = (parts[1] || "").replace(/0+$/, "");
    while (frac.length < 2) frac += "0";
    whole = whole.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
    return sign + whole + "." + frac;
  }
  function when(iso) {
    if (!iso) return "";
    var d = new Date(iso);
    return isNaN(d) ? iso : d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
  }
  function words(name) {
    var s = String(name || "").replace(/_/g, " ");
    return s.charAt(0).toUpperCase() + s.slice(1);
  }
  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // ---- errors in words -----------------------------------------------------------
  function explain(failure) {
    var e = failure.error || {};
    switch (failure.code) {
      case "token_expired":
        return { title: "Your sign-in link has expired", text: "For your security, sign-in links last only a short time. Go back to the product and open Billing again to get a fresh one.", signOut: true };
      case "missing_token": case "invalid_token":
        return { title: "This sign-in link is not valid", text: "The page could not confirm who you are. Open Billing again from the product.", signOut: true };
      case "insufficient_credits":
        return { title: "Not enough credits", text: "Your balance is " + credits(e.balance) + " credits and this needs " + credits(e.required) + " credits. Buy credits below to continue." };
      case "amount_out_of_range":
        var min = e.min !== undefined ? e.min : (e.min_credits !== undefined ? e.min_credits : bounds.min);
        var max = e.max !== undefined ? e.max : (e.max_credits !== undefined ? e.max_credits : bounds.max);
        return { field: "Purchases must be between " + min + " and " + max + " whole credits." };
      case "backend_unavailable": case "service_unavailable": case "backend_error": case "http_502": case "http_503": case "http_504":
        return { title: "Billing is temporarily unavailable", text: "We could not reach the billing service. Nothing was charged and your credits are safe. Please try again in a minute.", retry: true };
      case "purchases_disabled":
        return { title: "Buying credits is not available", text: "This server does not sell credits right now. Please try again later or contact support." };
      case "network":
        return { title: "You appear to be offline", text: "The page could not reach the server. Check your connection and try again.", retry: true };
      default:
        return { title: "Something went wrong", text: (failure.message || "The server refused the request.") + " (" + failure.code + ")" };
    }
  }

  function showAlert(failure) {
    var what = explain(failure);
    if (what.field) { fieldError(what.field); return; }
    $("alert-title").textContent = what.title;
    $("alert-text").textContent = what.text;
    var old = $("retry"); if (old) old.remove();
    if (what.retry) {
      var button = el("button", { id: "retry", type: "button", "class": "secondary" }, "Try again");
      button.style.marginTop = ".75rem";
      button.addEventListener("click", function () { hideAlert(); loadAll(); });
      $("alert").appendChild(button);
    }
    $("alert").hidden = false;
    if (what.signOut) {
      sessionStorage.removeItem(TOKEN_KEY);
      stopPolling();
      $("app").hidden = true;
      $("who").hidden = true;
    }
    // Keyboard and screen-reader users land on the explanation.
    $("alert").setAttribute("tabindex", "-1");
    $("alert").focus();
  }
  function hideAlert() { $("alert").hidden = true; }

  function fieldError(text) {
    var input = $("amount");
    $("amount-error").textContent = text;
    $("amount-error").hidden = !text;
    if (text) { input.setAttribute("aria-invalid", "true"); input.focus(); } else { input.removeAttribute("aria-invalid"); }
  }

  // ---- balance -------------------------------------------------------------------
  function renderBalance(b) {
    balance = b;
    var hasAvailable = b.available !== undefined && b.available !== null;
    $("balance-main").textContent = credits(hasAvailable ? b.available : b.balance);
    $("balance-main-label").textContent = hasAvailable ? "available to spend" : "balance";
    var parts = $("balance-parts");
    parts.textContent = "";
    var rows = [];
    if (hasAvailable) rows.push(["Balance", b.balance]);
    if (b.held !== undefined && b.held !== null) rows.push(["Held for requests in progress", b.held]);
    if (b.paid !== undefined) rows.push(["Paid", b.paid]);
    if (b.promotional !== undefined) rows.push(["Promotional", b.promotional]);
    rows.forEach(function (r) {
      parts.appendChild(el("dt", {}, r[0]));
      parts.appendChild(el("dd", { "data-part": r[0].split(" ")[0].toLowerCase() }, credits(r[1])));
    });
    var expiry = $("expiry");
    if (b.next_expiry) {
      expiry.textContent = credits(b.next_expiry.amount) + " credits expire on " + when(b.next_expiry.at) + ".";
      expiry.hidden = false;
    } else { expiry.hidden = true; }
    $("who").textContent = "Signed in as " + b.user_id;
    $("who").hidden = false;
  }
  function loadBalance() { return api("/api/credits/balance").then(renderBalance); }

  // ---- usage ---------------------------------------------------------------------
  function renderUsage(u) {
    $("tier").textContent = "Your tier: " + words(u.tier) + ". Limits count the last 30 days; each unit frees 30 days after it was used.";
    var list = $("usage");
    list.textContent = "";
    u.features.forEach(function (f) {
      var li = el("li", { "data-feature": f.feature });
      var head = el("div", { "class": "feature-head" });
      var name = el("span", { "class": "feature-name", id: "f-" + f.feature }, words(f.feature));
      var count;
      var bar = el("div", { "class": "bar", role: "progressbar", "aria-labelledby": "f-" + f.feature, "aria-valuemin": "0" });
      var fill = el("span");
      if (f.unlimited) {
        count = f.used + " used · unlimited";
        bar.classList.add("unlimited");
        bar.setAttribute("aria-valuetext", count);
        fill.style.width = "100%";
      } else {
        var limit = f.limit || 0;
        var pct = limit > 0 ? Math.min(100, Math.round(f.used * 100 / limit)) : 100;
        count = limit === 0 ? "not in your tier" : f.used + " of " + limit + " used";
        bar.setAttribute("aria-valuemax", String(limit));
        bar.setAttribute("aria-valuenow", String(Math.min(f.used, limit)));
        bar.setAttribute("aria-valuetext", count);
        fill.style.width = pct + "%";
        if (f.remaining === 0) bar.classList.add("full");
      }
      head.appendChild(name);
      head.appendChild(el("span", { "class": "feature-count" }, count));
      bar.appendChild(fill);
      li.appendChild(head);
      li.appendChild(bar);
      if (!f.unlimited && f.remaining === 0 && f.limit > 0) {
        li.appendChild(el("p", { "class": "frees" }, f.next_free_at
          ? "Limit reached. Next unit frees at " + when(f.next_free_at) + "."
          : "Limit reached."));
      }
      list.appendChild(li);
    });
  }
  function loadUsage() { return api("/api/tier/usage").then(renderUsage); }

  // ---- history -------------------------------------------------------------------
  function entryRow(e) {
    var tr = el("tr", { "data-entry": String(e.id) });
    tr.appendChild(el("td", { "class": "date" }, when(e.created_at)));
    var what = el("td");
    what.appendChild(document.createTextNode(e.description || words(e.kind)));
    what.appendChild(el("span", { "class": "kind" }, words(e.kind)));
    tr.appendChild(what);
    var negative = String(e.amount).charAt(0) === "-";
    tr.appendChild(el("td", { "class": "num " + (negative ? "neg" : "pos") }, (negative ? "" : "+") + credits(e.amount)));
    tr.appendChild(el("td", { "class": "num after" }, credits(e.balance_after)));
    return tr;
  }
  function loadHistory(more) {
    var path = "/api/credits/history?limit=" + HISTORY_PAGE + (more && historyCursor ? "&cursor=" + encodeURIComponent(historyCursor) : "");
    $("more").disabled = true;
    return api(path).then(function (h) {
      var rows = $("history-rows");
      if (!more) rows.textContent = "";
      h.entries.forEach(function (e) {
        rows.appendChild(entryRow(e));
        if (e.id > newestEntryId) newestEntryId = e.id;
      });
      historyCursor = h.next_cursor || null;
      $("more").hidden = !historyCursor;
      $("more").disabled = false;
      var shown = rows.children.length;
      $("history-empty").hidden = shown > 0;
      $("history-status").textContent = shown ? "Showing " + shown + (historyCursor ? " most recent entries" : (shown === 1 ? " entry" : " entries")) : "";
      return h;
    });
  }

  function downloadCsv() {
    var button = $("csv");
    button.disabled = true;
    button.textContent = "Preparing CSV…";
    // A plain link cannot carry the Authorization header: fetch, then hand over a Blob.
    api("/api/credits/history.csv", { raw: true })
      .then(function (response) { return response.blob(); })
      .then(function (blob) {
        var url = URL.createObjectURL(blob);
        var a = el("a", { href: url, download: "credits-history-" + new Date().toISOString().slice(0, 10) + ".csv" });
        document.body.appendChild(a);
        a.click();
        a.remove();
        setTimeout(function () { URL.revokeObjectURL(url); }, 60000);
      })
      .catch(showAlert)
      .then(function () { button.disabled = false; button.textContent = "Download CSV"; });
  }

  // ---- auto top-up (shown only where the server has it) -------------------------
  var TOPUP_LIMITS = { threshold: 1000000000, amount: 999999, monthly_cap: 1000000000 };
  var TOPUP_FIELDS = { threshold: "topup-threshold", amount: "topup-amount", monthly_cap: "topup-cap" };
  var TOPUP_NAMES = { threshold: "The threshold", amount: "The top-up amount", monthly_cap: "The monthly cap" };
  var TOPUP_CODES = { invalid_threshold: "threshold", invalid_topup_amount: "amount", invalid_monthly_cap: "monthly_cap" };

  function topupError(text, field) {
    Object.keys(TOPUP_FIELDS).forEach(function (k) { $(TOPUP_FIELDS[k]).removeAttribute("aria-invalid"); });
    $("topup-error").textContent = text || "";
    $("topup-error").hidden = !text;
    if (text && field) { $(TOPUP_FIELDS[field]).setAttribute("aria-invalid", "true"); $(TOPUP_FIELDS[field]).focus(); }
  }

  function topupStatus(kind, text) {
    var box = $("topup-status");
    box.className = "status " + kind;
    box.textContent = text;
  }

  function renderAutoTopup(t, fillForm) {
    var fields = $("autotopup-fields");
    fields.textContent = "";
    var rows = [];
    var state = t.suspended ? "Suspended" : (t.enabled ? "On" : "Off");
    rows.push(["Status", state]);
    rows.push(["Card saved", t.payment_method_saved ? "Yes" : "No"]);
    rows.push(["Used this month", credits(t.month_used) + " credits"]);
    if (t.last_attempt) {
      var a = t.last_attempt;
      rows.push(["Last top-up", credits(a.amount) + " credits, " + words(a.state).toLowerCase() + (a.failure_code ? " (" + words(a.failure_code).toLowerCase() + ")" : "")]);
    }
    rows.forEach(function (r) {
      fields.appendChild(el("dt", {}, r[0]));
      fields.appendChild(el("dd", { "data-topup": r[0].split(" ")[0].toLowerCase() }, r[1]));
    });
    var notes = [];
    if (t.suspended) notes.push("Your card was declined three times in a row, so auto top-up is paused. Buy credits with \u201cSave my card\u201d ticked to save a new card and resume it.");
    else if (t.retry_after) notes.push("Your card was declined; the next try is not before " + when(t.retry_after) + ".");
    if (!t.payment_method_saved) notes.push("No card is saved yet: buy credits with \u201cSave my card for auto top-up\u201d ticked.");
    var old = $("topup-action"); if (old) old.remove();
    if (t.last_attempt && t.last_attempt.state === "requires_action" && /^https?:\/\//.test(t.last_attempt.action_url || "")) {
      var link = el("a", { id: "topup-action", href: t.last_attempt.action_url, rel: "noopener" }, "Confirm the top-up payment with your bank");
      fields.parentNode.insertBefore(link, fields.nextSibling);
    }
    topupStatus(notes.length ? "stalled" : "", notes.join(" "));
    if (fillForm) {
      $("topup-enabled").checked = !!t.enabled;
      $("topup-threshold").value = t.threshold === null || t.threshold === undefined ? "" : String(t.threshold);
      $("topup-amount").value = t.amount === null || t.amount === undefined ? "" : String(t.amount);
      $("topup-cap").value = t.monthly_cap === null || t.monthly_cap === undefined ? "" : String(t.monthly_cap);
    }
    $("autotopup").hidden = false;
  }

  function loadAutoTopup(fillForm) {
    return api("/api/credits/auto-topup").then(function (t) {
      if (!t || typeof t !== "object") return;
      renderAutoTopup(t, fillForm !== false);
    }, function () { $("autotopup").hidden = true; });
  }

  function onTopupSave(event) {
    event.preventDefault();
    topupError("");
    hideAlert();
    var body = { enabled: $("topup-enabled").checked };
    var keys = ["threshold", "amount", "monthly_cap"];
    for (var i = 0; i < keys.length; i++) {
      var key = keys[i];
      var text = $(TOPUP_FIELDS[key]).value.trim();
      var n = /^\d+$/.test(text) ? Number(text) : NaN;
      if (!(n >= 1 && n <= TOPUP_LIMITS[key])) {
        topupError(TOPUP_NAMES[key] + " must be a whole number of credits from 1 to " + TOPUP_LIMITS[key].toLocaleString("en-US") + ".", key);
        return;
      }
      body[key] = n;
    }
    var button = $("topup-save");
    button.disabled = true;
    api("/api/credits/auto-topup", { method: "PUT", body: JSON.stringify(body) })
      .then(function (t) {
        renderAutoTopup(t, true);
        topupStatus("done", "Auto top-up saved: " + (t.enabled ? "on, buying " + t.amount + " credits below " + t.threshold + ", at most " + t.monthly_cap + " a month." : "off."));
      })
      .catch(function (failure) {
        var field = TOPUP_CODES[failure.code];
        if (field) topupError(failure.message || "Check this value.", field);
        else showAlert(failure);
      })
      .then(function () { button.disabled = false; });
  }

  // ---- buying --------------------------------------------------------------------
  function status(kind, html) {
    var box = $("purchase-status");
    box.className = "status " + kind;
    box.textContent = "";
    html.forEach(function (node) { box.appendChild(typeof node === "string" ? document.createTextNode(node) : node); });
  }

  function onBuy(event) {
    event.preventDefault();
    fieldError("");
    hideAlert();
    var text = $("amount").value.trim();
    if (!/^\d+$/.test(text)) { fieldError("Enter a whole number of credits, for example 25."); return; }
    var amount = Number(text);
    if (amount < bounds.min || amount > bounds.max) {
      fieldError("Purchases must be between " + bounds.min + " and " + bounds.max + " whole credits; you entered " + amount + ".");
      return;
    }
    var button = $("buy-button");
    button.disabled = true;
    status("pending", [el("span", { "class": "spinner", "aria-hidden": "true" }), "Opening Stripe Checkout…"]);
    var purchase = { amount: amount };
    if ($("save-card").checked) purchase.save_payment_method = true;
    api("/api/credits/purchase", { method: "POST", body: JSON.stringify(purchase) })
      .then(function (p) {
        sessionStorage.setItem(PENDING_KEY, JSON.stringify({
          sub: claims.sub, amount: p.amount, amount_micros: p.amount_micros, session_id: p.session_id,
          last_id: newestEntryId, started: Date.now()
        }));
        location.assign(p.checkout_url);
      })
      .catch(function (failure) {
        button.disabled = false;
        status("", []);
        showAlert(failure);
      });
  }

  function readPending() {
    try {
      var p = JSON.parse(sessionStorage.getItem(PENDING_KEY) || "null");
      return p && p.sub === claims.sub ? p : null;
    } catch (e) { return null; }
  }

  function stopPolling() { if (pollTimer) { clearTimeout(pollTimer); pollTimer = null; } }

  // After Checkout, Stripe's webhook may land before or after the browser comes back:
  // poll until the purchase shows in the ledger, saying so all along.
  function waitForCredit(pending) {
    stopPolling();
    status("pending", [el("span", { "class": "spinner", "aria-hidden": "true" }),
      "Payment sent. Waiting for Stripe to confirm your " + credits(pending.amount) + " credits… Your balance updates here by itself."]);
    var check = function () {
      Promise.all([loadBalance(), api("/api/credits/history?limit=" + HISTORY_PAGE)]).then(function (results) {
        var landed = results[1].entries.some(function (e) {
          return e.id > (pending.last_id || 0) && e.kind === "purchase" && e.amount_micros === pending.amount_micros;
        });
        if (landed) {
          sessionStorage.removeItem(PENDING_KEY);
          status("done", [credits(pending.amount) + " credits added. Your balance is now " + credits(balance.available !== undefined && balance.available !== null ? balance.available : balance.balance) + " credits."]);
          $("buy-button").disabled = false;
          loadHistory(false);
          // A purchase that saved a card changes auto top-up (card saved, suspension lifted).
          loadAutoTopup(false);
          return;
        }
        if (Date.now() - pending.started > POLL_GIVE_UP_MS) {
          var again = el("button", { type: "button", "class": "secondary" }, "Check again");
          again.addEventListener("click", function () { pending.started = Date.now(); waitForCredit(pending); });
          status("stalled", ["Stripe has not confirmed the payment yet. If you paid, the credits appear here as soon as it does; you can leave this page. ", again]);
          return;
        }
        pollTimer = setTimeout(check, POLL_MS);
      }, function (failure) {
        if (failure.code === "token_expired" || failure.code === "invalid_token") { showAlert(failure); return; }
        pollTimer = setTimeout(check, POLL_MS * 2);
      });
    };
    check();
  }

  // ---- start ---------------------------------------------------------------------
  function loadAll() {
    return Promise.all([loadBalance(), loadUsage(), loadHistory(false)]).then(function () {
      $("app").hidden = false;
      loadAutoTopup();
    });
  }

  function start() {
    var checkout = readToken();
    $("amount").min = String(bounds.min);
    $("amount").max = String(bounds.max);
    $("buy").addEventListener("submit", onBuy);
    $("more").addEventListener("click", function () { loadHistory(true).catch(showAlert); });
    $("csv").addEventListener("click", downloadCsv);
    $("autotopup-form").addEventListener("submit", onTopupSave);
    $("amount").addEventListener("input", function () { fieldError(""); });
    // A new sign-in link opened in this tab changes only the fragment: start afresh.
    window.addEventListener("hashchange", function () {
      if (/(?:^#|&)token=/.test(location.hash)) { readToken(); location.reload(); }
    });
    if (!token) { $("signed-out").hidden = false; return; }
    if (claims.exp && claims.exp * 1000 <= Date.now()) {
      showAlert(new ApiFailure(401, { code: "token_expired" }));
      return;
    }
    loadAll().then(function () {
      var pending = readPending();
      if (checkout === "cancel") {
        sessionStorage.removeItem(PENDING_KEY);
        status("", ["Checkout was cancelled. Nothing was charged."]);
      } else if (pending) {
        waitForCredit(pending);
      }
    }).catch(showAlert);
  }

  start();
})();
