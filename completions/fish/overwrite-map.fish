function __overwrite-map_should_offer_completions_for_flags_or_options -a expected_commands
    set -l non_repeating_flags_or_options $argv[2..]
    set -l non_repeating_flags_or_options_absent 0
    set -l positional_index 0
    set -l commands
    __overwrite-map_parse_tokens
    test "$commands" = "$expected_commands"; and return $non_repeating_flags_or_options_absent
end

function __overwrite-map_should_offer_completions_for_positional -a expected_commands positional_index_comparison expected_positional_index
    set -l non_repeating_flags_or_options
    set -l non_repeating_flags_or_options_absent 0
    set -l positional_index 0
    set -l commands
    __overwrite-map_parse_tokens
    test "$commands" = "$expected_commands" -a \( "$positional_index" "$positional_index_comparison" "$expected_positional_index" \)
end

function __overwrite-map_parse_tokens -S
    set -l unparsed_tokens (__overwrite-map_tokens -pc)
    switch $unparsed_tokens[1]
    case 'overwrite-map'
        __overwrite-map_parse_subcommand 0 'h/help'
        switch $unparsed_tokens[1]
        case 'create'
            __overwrite-map_parse_subcommand 1 'size=' 'like=' 'block-size=' 'name=' 'meaning=' 'force' 'h/help'
        case 'show'
            __overwrite-map_parse_subcommand 1 'h/help'
        case 'stats'
            __overwrite-map_parse_subcommand 1 'json' 'h/help'
        case 'extents'
            __overwrite-map_parse_subcommand 1 'h/help'
        case 'set'
            __overwrite-map_parse_subcommand 3 'h/help'
        case 'clear'
            __overwrite-map_parse_subcommand 3 'h/help'
        case 'union'
            __overwrite-map_parse_subcommand 2 'o/output=' 'h/help'
        case 'intersect'
            __overwrite-map_parse_subcommand 2 'o/output=' 'h/help'
        case 'subtract'
            __overwrite-map_parse_subcommand 2 'o/output=' 'h/help'
        case 'invert'
            __overwrite-map_parse_subcommand 1 'o/output=' 'h/help'
        case 'rescale'
            __overwrite-map_parse_subcommand 1 'block-size=' 'o/output=' 'h/help'
        case 'import'
            __overwrite-map_parse_subcommand 2 'size=' 'like=' 'block-size=' 'name=' 'meaning=' 'status=' 'any-byte' 'h/help'
        case 'export'
            __overwrite-map_parse_subcommand 2 'set-status=' 'clear-status=' 'h/help'
        case 'owed'
            __overwrite-map_parse_subcommand 0 'journal=' 'activity-log=' 'copy=' 'o/output=' 'h/help'
        case 'help'
            __overwrite-map_parse_subcommand -r 1 
        end
    end
end

function __overwrite-map_tokens
    if test (string split -m 1 -f 1 -- . "$FISH_VERSION") -gt 3
        commandline --tokens-raw $argv
    else
        commandline -o $argv
    end
end

function __overwrite-map_parse_subcommand -S -a positional_count
    argparse -s r -- $argv
    set -l option_specs $argv[2..]
    set -l is_repeating_positional $_flag_r
    set -el _flag_r
    set -a commands $unparsed_tokens[1]
    set positional_index 0
    while true
        set -e unparsed_tokens[1]
        argparse -sn "$commands" $option_specs -- $unparsed_tokens 2> /dev/null
        set unparsed_tokens $argv
        set positional_index (math $positional_index + 1)
        for non_repeating_flag_or_option in $non_repeating_flags_or_options
            if set -ql "_flag_$(string replace -a - _ -- $non_repeating_flag_or_option)"
                set non_repeating_flags_or_options_absent 1
                break
            end
        end
        test (count $unparsed_tokens) -eq 0 -o \( -z "$is_repeating_positional" -a "$positional_index" -gt "$positional_count" \) && break
    end
end

function __overwrite-map_complete_directories
    set -l token (commandline -t)
    string match -- '*/' $token
    set -l subdirs $token*/
    printf %s\n $subdirs
end

function __overwrite-map_custom_completion
    set -x SAP_SHELL fish
    set -x SAP_SHELL_VERSION $FISH_VERSION
    set -l tokens (__overwrite-map_tokens -p)
    if test -z "$(__overwrite-map_tokens -t)"
        set -l index (count (__overwrite-map_tokens -pc))
        set tokens $tokens[..$index] \'\' $tokens[(math $index + 1)..]
    end
    command $tokens[1] $argv $tokens
end

complete -c 'overwrite-map' -f
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_positional "overwrite-map" -eq 1' -fa 'create' -d 'Create an empty map (no block set) for a device.'
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_positional "overwrite-map" -eq 1' -fa 'show' -d 'Print a summary of a map for people.'
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_positional "overwrite-map" -eq 1' -fa 'stats' -d 'Print a map\'s figures for scripts.'
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_positional "overwrite-map" -eq 1' -fa 'extents' -d 'Print the runs of set blocks as byte ranges.'
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_positional "overwrite-map" -eq 1' -fa 'set' -d 'Set the blocks of a byte range.'
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_positional "overwrite-map" -eq 1' -fa 'clear' -d 'Clear the blocks of a byte range.'
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_positional "overwrite-map" -eq 1' -fa 'union' -d 'Blocks set in A or in B.'
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_positional "overwrite-map" -eq 1' -fa 'intersect' -d 'Blocks set in both A and B.'
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_positional "overwrite-map" -eq 1' -fa 'subtract' -d 'Blocks set in A and not in B.'
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_positional "overwrite-map" -eq 1' -fa 'invert' -d 'Blocks not set in A.'
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_positional "overwrite-map" -eq 1' -fa 'rescale' -d 'Change a map\'s block size, over the same device.'
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_positional "overwrite-map" -eq 1' -fa 'import' -d 'Make a map from a GNU ddrescue mapfile.'
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_positional "overwrite-map" -eq 1' -fa 'export' -d 'Write a map as a GNU ddrescue mapfile.'
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_positional "overwrite-map" -eq 1' -fa 'owed' -d 'Map the blocks a stopped server\'s mirror journal owes a far copy.'
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_positional "overwrite-map" -eq 1' -fa 'help' -d 'Show subcommand help information.'
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map create" size' -l 'size' -d 'Size of the device in bytes (K, M, G, T: powers of 1024).' -rfka ''
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map create" like' -l 'like' -d 'Take the size and name from this image file or block device.' -rfka ''
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map create" block-size' -l 'block-size' -d 'Block size: a power of two from 512 to 64M (K, M: powers of 1024).' -rfka ''
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map create" name' -l 'name' -d 'Name of the device the map describes, for people (default: the --like path).' -rfka ''
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map create" meaning' -l 'meaning' -d 'What a set bit means (default: current).' -rfka 'current differs changed selected'
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map create" force' -l 'force' -d 'Replace an existing map.'
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map create" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map show" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map stats" json' -l 'json' -d 'Print one JSON object.'
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map stats" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map extents" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map set" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map clear" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map union" o output' -l 'output' -s 'o' -d 'Write the result to this file (saved atomically) instead of standard output.' -rfka ''
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map union" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map intersect" o output' -l 'output' -s 'o' -d 'Write the result to this file (saved atomically) instead of standard output.' -rfka ''
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map intersect" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map subtract" o output' -l 'output' -s 'o' -d 'Write the result to this file (saved atomically) instead of standard output.' -rfka ''
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map subtract" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map invert" o output' -l 'output' -s 'o' -d 'Write the result to this file (saved atomically) instead of standard output.' -rfka ''
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map invert" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map rescale" block-size' -l 'block-size' -d 'The new block size: a power of two from 512 to 64M (K, M: powers of 1024).' -rfka ''
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map rescale" o output' -l 'output' -s 'o' -d 'Write the result to this file (saved atomically) instead of standard output.' -rfka ''
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map rescale" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map import" size' -l 'size' -d 'Size of the device in bytes (K, M, G, T: powers of 1024).' -rfka ''
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map import" like' -l 'like' -d 'Take the size and name from this image file or block device.' -rfka ''
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map import" block-size' -l 'block-size' -d 'Block size: a power of two from 512 to 64M (K, M: powers of 1024).' -rfka ''
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map import" name' -l 'name' -d 'Name of the device the map describes, for people (default: the --like path).' -rfka ''
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map import" meaning' -l 'meaning' -d 'What a set bit means (default: current).' -rfka 'current differs changed selected'
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map import" status' -l 'status' -d 'ddrescue status characters that set a block (from ?*/-+).' -rfka ''
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map import" any-byte' -l 'any-byte' -d 'Set a block when any byte of it has a selected status.'
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map import" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map export" set-status' -l 'set-status' -d 'Status character of set blocks.' -rfka ''
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map export" clear-status' -l 'clear-status' -d 'Status character of clear blocks.' -rfka ''
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map export" h help' -s 'h' -l 'help' -d 'Show help information.'
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map owed" journal' -l 'journal' -d 'The stopped server\'s mirror journal (MAP.mirror).' -rfka ''
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map owed" activity-log' -l 'activity-log' -d 'The server\'s activity log (default: MAP.al for a journal named MAP.mirror).' -rfka ''
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map owed" copy' -l 'copy' -d 'The far copy, by its URI as given to the server or its place in the positions file (0 first); needed when there are several.' -rfka ''
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map owed" o output' -l 'output' -s 'o' -d 'Write the result to this file (saved atomically) instead of standard output.' -rfka ''
complete -c 'overwrite-map' -n '__overwrite-map_should_offer_completions_for_flags_or_options "overwrite-map owed" h help' -s 'h' -l 'help' -d 'Show help information.'
