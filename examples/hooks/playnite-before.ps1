# Playnite (Windows): Settings → Scripts → Game scripts → "Execute before starting a game"
# (or per game: Edit → Scripts → "Execute before starting a game"). PowerShell 5.1.
#
# Playnite runs this synchronously on its UI thread, so it must return in milliseconds:
# Start-Process returns at once and igdtrigger gives up on the service after 1 s. The activation
# lasts at most 6 h; playnite-after.ps1 ends it when the game exits.
#
# The rule is named after the game: "Quake Champions" -> "quake-champions". Map other names
# below, or give your rules those names. $Server: the machine running `igdtrigger serve`.
$Server = "http://127.0.0.1:8731"
$Rules = @{
    # "Call of Duty: Modern Warfare III" = "cod";
}
$Rule = $Rules[$Game.Name]
if (-not $Rule) { $Rule = (($Game.Name.ToLower() -replace '[^a-z0-9_.]+', '-').Trim('-.')) }
Start-Process -WindowStyle Hidden -FilePath "igdtrigger.exe" `
    -ArgumentList @("activate", $Rule, "--for", "6h", "--timeout", "1", "--server", $Server)
