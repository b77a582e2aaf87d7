def test_login_and_pages(make_seat, browser_for):
    boss = make_seat("boss@corp.cn", role="boss")
    b = browser_for(boss)
    for path in ["/", "/accounts/", "/contacts/", "/leads/", "/opportunities/", "/opportunities/board",
                 "/tickets/", "/activities/", "/search/?q=x", "/admin/seats", "/admin/audit", "/admin/logins",
                 "/admin/roles", "/accounts/new", "/contacts/new", "/leads/new", "/opportunities/new",
                 "/tickets/new", "/activities/new"]:
        resp = b.get(path)
        assert resp.status_code == 200, (path, resp.get_data(as_text=True)[:3000])
